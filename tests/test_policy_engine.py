"""Policy engine against ABI-conformant modules built from agent_devkit/opa/*.c (real Wasm, real wasmtime)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.config.policy import PolicySettings
from agent.policy.builtins import default_builtins
from agent.policy.engine import NO_INPUT, Policy, PolicyEvalError, PolicyLoadError, load_policy
from agent.policy.errors import BuiltinError
from agent.policy.registry import PolicyRegistry
from agent.policy.registry_builtins import UNDEFINED, BuiltinContext
from agent_devkit.opa.build import RBAC_DATA, build

RBAC_INPUTS = [{"user": "bob", "action": "read", "type": "finance"},
               {"user": "alice", "action": "delete", "type": "anything"},
               {"user": "eve", "action": "update", "type": "cat"},
               {"user": "mallory"}, {}, [1, 2], "text \u00e9\u2028 \\ \"q\"", None, 12345678901234567890123]


def settings(**kw: Any) -> PolicySettings:
    """Generous deadline unless a test is about deadlines: the CI box is shared and noisy."""
    kw.setdefault("eval_deadline_ms", 5000)
    return PolicySettings(**kw)


def load(source: Any, **kw: Any) -> Policy:
    kw.setdefault("settings", settings())
    return load_policy(source, **kw)


def rbac(minor: int | None = 3, fast: bool = True, **kw: Any) -> Policy:
    return load_policy(build("rbac", minor=minor), data=RBAC_DATA, settings=settings(fast_calls=fast, **kw))


def test_rbac_package_and_rule_entrypoints() -> None:
    p = rbac()
    assert p.entrypoints == {"app/rbac": 0, "app/rbac/allow": 1}
    assert p.abi_version == (1, 3) and p.fast_path
    rs = p.evaluate({"user": "bob", "action": "read", "type": "finance"})
    assert rs.defined
    assert rs.value["allow"] is True
    assert "user_is_admin" not in rs.value  # undefined rule: absent, as OPA gives it
    assert {"action": "read", "type": "finance"} in rs.value["user_is_granted"]
    assert p.evaluate({"user": "alice", "action": "x", "type": "y"}, "app/rbac/allow").raw == [{"result": True}]
    assert p.evaluate({"user": "eve", "action": "update", "type": "cat"}, "app/rbac/allow").raw == \
        [{"result": False}]


@pytest.mark.parametrize("minor", [None, 0, 1, 2, 3])
def test_every_abi_minor_and_both_call_paths_agree(minor: int | None) -> None:
    reference = rbac(3, fast=False)
    for fast in (True, False):
        p = rbac(minor, fast=fast)
        assert p.fast_path == (minor is not None and minor >= 2)
        for doc in RBAC_INPUTS:
            for ep in ("app/rbac", "app/rbac/allow"):
                got = p.evaluate_raw(doc, ep)[1]
                assert got == reference.evaluate_raw(doc, ep)[1], (minor, fast, doc, ep)
        assert p.evaluate(NO_INPUT).raw == reference.evaluate(NO_INPUT).raw


def test_unsupported_major_version_is_refused() -> None:
    with pytest.raises(PolicyLoadError, match="ABI 2"):
        load(build("rbac", major=2), data=RBAC_DATA)


def test_result_sets_keep_undefined_false_and_null_apart() -> None:
    p = load(build("sandbox"))
    assert p.evaluate(None, "ok/false").raw == [{"result": False}]
    null = p.evaluate(None, "ok/null")
    assert null.raw == [{"result": None}] and null.defined and null.value is None
    undef = p.evaluate({"a": 1}, "ok/undefined")
    assert undef.raw == [] and not undef.defined
    assert p.evaluate(NO_INPUT, "ok/echo").raw == []          # input undefined
    assert p.evaluate(None, "ok/echo").raw == [{"result": None}]  # input null
    big = p.evaluate_raw(12345678901234567890123456789, "ok/echo")[1]
    assert big == b'[{"result":12345678901234567890123456789}]'


def test_unknown_entrypoint_is_a_typed_error() -> None:
    p = rbac()
    with pytest.raises(PolicyEvalError) as err:
        p.evaluate({}, "app/nope")
    assert err.value.code == "unknown_entrypoint" and "app/rbac/allow" in str(err.value)


@pytest.mark.parametrize("minor", [1, 3])
def test_data_updates_are_seen_and_do_not_leak(minor: int) -> None:
    p = load(build("sandbox", minor=minor), data={"k": "v1"})
    assert p.evaluate({"key": "k"}, "ok/data_path").raw == [{"result": "v1"}]
    inst = p._idle[0]
    for i in range(40):
        p.set_data({"k": f"v{i}", "pad": "x" * 5000})
        assert p.evaluate({"key": "k"}, "ok/data_path").raw == [{"result": f"v{i}"}]
        for _ in range(5):
            assert p.evaluate({"key": "pad"}, "ok/data_path").value == "x" * 5000
    p.set_data(None)
    assert p.evaluate(None, "ok/data").raw == [{"result": {}}]
    if minor >= 3:  # 1.3: reloaded in place (stash protocol), memory stays bounded
        assert p._idle[0] is inst
        assert inst.memory.data_len(inst.store) <= 4 * 65536
    assert p.stats.errors == 0


@pytest.mark.parametrize("fast", [True, False])
def test_sandbox_survives_hostile_policies(fast: bool) -> None:
    p = load(build("sandbox"), settings=settings(fast_calls=fast, eval_deadline_ms=200, memory_limit_mb=8,
                                                        max_output_bytes=100_000))
    cases = [("bad/loop", {}, "deadline", "deadline"), ("bad/abort", {}, "abort", "eval_conflict_error"),
             ("bad/bomb", {}, "memory", "out of memory"), ("bad/huge", {"n": 200_000}, "output_too_large", "limit"),
             ("bad/trap", {}, "trap", "")]
    for ep, doc, code, text in cases:
        before = p.stats.instances_discarded
        with pytest.raises(PolicyEvalError) as err:
            p.evaluate(doc, ep)
        assert err.value.code == code, (ep, err.value)
        assert text in str(err.value)
        assert p.stats.instances_discarded == before + 1
        assert p.evaluate({"still": "alive"}, "ok/echo").raw == [{"result": {"still": "alive"}}]
    assert p.evaluate({"n": 1000}, "bad/huge").value == "x" * 1000
    assert p.stats.deadline_hits == 1 and p.stats.errors == 5
    with pytest.raises(PolicyEvalError) as err:  # an input larger than the memory cap
        p.evaluate("y" * (9 * 1024 * 1024), "ok/echo")
    assert err.value.code == "memory"


def test_abort_during_start_function_fails_the_load() -> None:
    with pytest.raises(PolicyLoadError, match="runtime self-check failed"):
        load(build("sandbox", defines=("ABORT_IN_START",)))


def _builtins_with_customs(calls: list[Any]) -> Any:
    reg = default_builtins().copy()

    def zero(ctx: BuiltinContext) -> Any:
        return {"zero": True}

    def undef(ctx: BuiltinContext, x: Any) -> Any:
        calls.append(x)
        return UNDEFINED if x == "undefined" else {"echo": x}

    def cat4(ctx: BuiltinContext, *xs: Any) -> Any:
        return "|".join(str(x) for x in xs)

    def fail(ctx: BuiltinContext, x: Any) -> Any:
        raise BuiltinError(f"refusing {x}")

    for name, fn in (("custom.zero", zero), ("custom.undef", undef), ("custom.cat4", cat4), ("custom.fail", fail)):
        reg.register(name, fn)
    return reg


@pytest.mark.parametrize("fast", [True, False])
def test_builtin_dispatch_by_noncontiguous_id(fast: bool) -> None:
    calls: list[Any] = []
    p = load(build("builtins"), builtins=_builtins_with_customs(calls), settings=settings(fast_calls=fast))
    assert p.required_builtins == sorted(["sprintf", "time.now_ns", "custom.zero", "custom.undef", "custom.cat4",
                                          "custom.fail"])
    assert p.evaluate({"name": "tank-3", "n": 7, "pct": 12.345}, "t/fmt").value == "tank-3 has 7 items (12.35%)"
    now = p.evaluate(None, "t/now").value
    assert now[0] == now[1] and now[0] > 1_600_000_000 * 10**9
    assert p.evaluate("undefined", "t/undef").raw == []  # host returned undefined (address 0)
    assert p.evaluate({"a": [1]}, "t/undef").value == {"echo": {"a": [1]}}
    assert calls == ["undefined", {"a": [1]}]
    assert p.evaluate(["a", 2, True, None], "t/cat4").value == "a|2|True|None"
    assert p.evaluate(["x", "y", "z"], "t/call3").value == "x|y|z"
    assert p.evaluate(None, "t/zero").value == {"zero": True}
    with pytest.raises(PolicyEvalError) as err:
        p.evaluate("bad", "t/fail")
    assert err.value.code == "builtin_error" and "refusing bad" in str(err.value)
    assert p.evaluate(None, "t/zero").value == {"zero": True}


def test_missing_builtin_is_refused_at_load_by_name() -> None:
    with pytest.raises(PolicyLoadError) as err:
        load(build("builtins", defines=("EXTRA_BUILTIN",)), builtins=_builtins_with_customs([]))
    assert "crypto.x509.parse_certificates" in str(err.value)
    assert err.value.code == "policy_builtin_missing"


def _bundle(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_bundle_with_nested_data_and_manifest_entrypoint() -> None:
    manifest = {"revision": "r1", "roots": [""], "rego_version": 1,
                "wasm": [{"entrypoint": "app/rbac/allow", "module": "/policy.wasm"},
                         {"entrypoint": "app/rbac", "module": "/policy.wasm"}]}
    rbac_data = RBAC_DATA["app"]["rbac"]
    blob = _bundle({"/data.json": b"{}", "/app/rbac/data.json": json.dumps(rbac_data).encode(),
                    "/policy.wasm": build("rbac"), "/.manifest": json.dumps(manifest).encode(),
                    "/app.rego": b"package app.rbac\n"})
    p = load(blob)
    assert p.default_entrypoint == "app/rbac/allow"
    assert p.evaluate({"user": "bob", "action": "read", "type": "finance"}).raw == [{"result": True}]
    bad = dict(manifest, wasm=[{"entrypoint": "app/other", "module": "/policy.wasm"}])
    with pytest.raises(PolicyLoadError, match="app/other"):
        load(_bundle({"/policy.wasm": build("rbac"), "/.manifest": json.dumps(bad).encode()}))


def test_not_a_policy_is_refused_clearly() -> None:
    with pytest.raises(PolicyLoadError, match="not a WebAssembly module"):
        load(b"hello")
    with pytest.raises(PolicyLoadError, match="not part of the OPA Wasm ABI"):
        load(_wat('(module (import "wasi" "fd_write" (func)) (memory (export "memory") 1))'))


def _wat(text: str) -> bytes:
    import wasmtime
    return bytes(wasmtime.wat2wasm(text))


def test_concurrent_evaluations_and_atomic_swap() -> None:
    registry = PolicyRegistry()
    old = rbac()
    old.version = 1
    assert registry.swap("gate", old) is None
    new = load(build("rbac"), data={"app": {"rbac": {"user_roles": {}, "role_grants": {}}}},
                      name="gate", version=2)
    errors: list[BaseException] = []
    seen: set[tuple[int, bool]] = set()
    stop = threading.Event()

    def worker() -> None:
        try:
            while not stop.is_set():
                policy = registry.get("gate")
                assert policy is not None
                allowed = policy.evaluate({"user": "bob", "action": "read", "type": "finance"}).value["allow"]
                assert allowed is (policy.version == 1)  # never a mix of old code/data and new
                seen.add((policy.version, allowed))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(200):
            if old.stats.evals > 50:
                break
            threading.Event().wait(0.01)
        assert registry.swap("gate", new) is old
        for _ in range(200):
            if new.stats.evals > 50:
                break
            threading.Event().wait(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert not errors, errors
    assert seen == {(1, True), (2, False)}
    health = registry.health("gate")
    assert health is not None and health["version"] == 2 and health["evals"] == new.stats.evals
    assert sum(health["latency_counts"]) == health["evals"]


def test_optional_println_import_and_large_inputs_move_memory() -> None:
    plain = load(build("sandbox"))
    printing = load(build("sandbox", defines=("WITH_PRINTLN",)))
    assert "opa_println" not in plain.shape.imports and "opa_println" in printing.shape.imports
    assert printing.evaluate(None, "ok/print").raw == plain.evaluate(None, "ok/print").raw == [{"result": True}]
    for fast in (True, False):
        p = load(build("sandbox"), settings=settings(fast_calls=fast, max_output_bytes=8 << 20))
        doc = {"blob": "z" * (3 * 1024 * 1024), "n": list(range(1000))}
        assert p.evaluate(doc, "ok/echo").value == doc  # host grows first, guest grows more while parsing
        assert p.evaluate({"small": 1}, "ok/echo").value == {"small": 1}


def test_code_cache_is_used_for_installed_artifacts(tmp_path: Path) -> None:
    from agent.storage import Store
    from agent.wasm import codecache
    from agent.wasm.engine import shared_engine
    store = Store.open(tmp_path)
    try:
        wasm = build("rbac")
        p1 = load(wasm, data=RBAC_DATA, code_cache=store)
        conn = store.reader()
        try:
            assert codecache.lookup(conn, shared_engine(), hashlib.sha256(wasm).hexdigest()) is not None
        finally:
            conn.close()
        p2 = load(wasm, data=RBAC_DATA, code_cache=store)
        doc = {"user": "bob", "action": "read", "type": "finance"}
        assert p1.evaluate(doc).raw == p2.evaluate(doc).raw
    finally:
        store.close()


def test_fast_path_unavailable_falls_back_to_public_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.wasm import calls
    monkeypatch.setattr(calls, "fast_path", lambda: None)
    p = rbac(fast=True)
    assert isinstance(p._idle[0].calls, calls.PublicCalls)
    doc = {"user": "bob", "action": "read", "type": "finance"}
    monkeypatch.undo()
    fast = rbac(fast=True)
    assert isinstance(fast._idle[0].calls, calls.FastCalls)
    assert p.evaluate_raw(doc)[1] == fast.evaluate_raw(doc)[1]
    with pytest.raises(PolicyEvalError, match="unreachable"):
        load(build("sandbox")).evaluate({}, "bad/trap")


def _looping_policy_wat(loop_in: str) -> str:
    """An ABI-shaped module whose start function or builtins() (read first at load) never returns."""
    spin = "(loop $l (br $l))"
    return f"""
    (module
      (import "env" "memory" (memory 2))
      (import "env" "opa_abort" (func $abort (param i32)))
      (export "memory" (memory 0))
      (global (export "opa_wasm_abi_version") i32 (i32.const 1))
      (global (export "opa_wasm_abi_minor_version") i32 (i32.const 3))
      (func $start {spin if loop_in == "start" else ""})
      (start $start)
      (func (export "opa_malloc") (param i32) (result i32) (i32.const 1024))
      (func (export "opa_json_parse") (param i32 i32) (result i32) (i32.const 0))
      (func (export "opa_json_dump") (param i32) (result i32) (i32.const 0))
      (func (export "opa_heap_ptr_get") (result i32) (i32.const 2048))
      (func (export "opa_heap_ptr_set") (param i32))
      (func (export "builtins") (result i32) {spin if loop_in == "builtins" else ""} (i32.const 0))
      (func (export "entrypoints") (result i32) (i32.const 0))
      (func (export "opa_eval_ctx_new") (result i32) (i32.const 0))
      (func (export "opa_eval_ctx_set_input") (param i32 i32))
      (func (export "opa_eval_ctx_set_data") (param i32 i32))
      (func (export "opa_eval_ctx_set_entrypoint") (param i32 i32))
      (func (export "opa_eval_ctx_get_result") (param i32) (result i32) (i32.const 0))
      (func (export "eval") (param i32) (result i32) (i32.const 0))
    )"""


@pytest.mark.parametrize("loop_in", ["start", "builtins"])
def test_a_policy_that_loops_while_loading_is_refused_not_hung(loop_in: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import wasmtime

    import agent.policy.engine as engine_mod

    monkeypatch.setattr(engine_mod, "SETUP_DEADLINE_S", 0.2)
    wasm = wasmtime.wat2wasm(_looping_policy_wat(loop_in))
    with pytest.raises(PolicyLoadError) as info:
        load(bytes(wasm))
    assert "interrupt" in str(info.value).lower() or "did not finish within 0.2 s" in str(info.value)


def test_pre_encoded_input_evaluates_like_the_value_and_bad_json_fails_the_evaluation() -> None:
    from agent.policy.engine import encode_input

    p = rbac()
    for doc in RBAC_INPUTS:
        assert p.evaluate_json(encode_input(doc)) == p.evaluate_raw(doc)
    assert p.evaluate_json(None) == p.evaluate_raw(NO_INPUT)
    echo = load(build("sandbox"))
    text = encode_input({"a": [1, "\u00e9"]})
    assert json.loads(echo.evaluate_json(text, "ok/echo")[1]) == [{"result": {"a": [1, "\u00e9"]}}]
    with pytest.raises(PolicyEvalError):  # not JSON: the guest refuses it, the instance is replaced
        echo.evaluate_json(b'{"a": ', "ok/echo")
    assert echo.evaluate({"still": "alive"}, "ok/echo").value == {"still": "alive"}
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    for bad in ({"x": float("nan")}, {"x": object()}, cyclic):
        with pytest.raises(PolicyEvalError) as err:
            encode_input(bad)
        assert err.value.code == "bad_input"
    assert encode_input({"k": [1.5, None, True, "\u00e9\u2028"], 2: -0.0}) == \
        json.dumps({"k": [1.5, None, True, "\u00e9\u2028"], 2: -0.0}, separators=(",", ":")).encode()
