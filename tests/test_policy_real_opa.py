"""The policy engine against OPA's real Wasm runtime and the official OPA JS SDK as oracle.

No finished ``opa build -t wasm`` output can be had from the registries this project reaches, but OPA
v1.20.2's own runtime library can (``tests/policies/opa-real/README.md``: origin, licence, search).
``opa_link.py`` links small hand-planned policies against it the way OPA's Wasm backend does, so the
``real`` module runs OPA's real allocator, JSON, numbers, value model, ``opa_eval`` and heap stash.

* ``expected-js-sdk.json``: what the JS SDK (``@open-policy-agent/opa-wasm`` 1.10.0, node) returned,
  recorded once, on the ``real`` module and the hand-made ``rbac``/``sandbox`` test policies. The
  always-on tests compare the engine with it: fast path (ABI 1.3, ``opa_eval``) and context path
  (ABI 1.1), the fast and the public wasmtime call adapter, raw wasm and bundle.
* On the real runtime: data replacement (1.3 stash protocol), bounded memory, large input, abort.
* ``test_js_sdk_live_agrees`` re-runs the JS SDK when node and the package are present
  (``var/opa-js``, or ``OPA_WASM_JS_DIR``) and compares it with the recording.
* A complete OPA-built module dropped into ``tests/policies/opa-real/`` as ``NAME.wasm`` /
  ``NAME.tar.gz`` with ``NAME.cases.json`` is picked up by ``test_real_opa_modules``.

Re-record (after changing a test policy or the cases): ``.venv/bin/python -m tests.test_policy_real_opa record``.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import pytest

from agent.config.policy import PolicySettings
from agent.policy.engine import NO_INPUT, Policy, PolicyEvalError, load_policy
from agent_devkit.opa.build import build

HERE = Path(__file__).resolve().parent
REAL_DIR = HERE / "policies" / "opa-real"
EXPECTED_FILE = REAL_DIR / "expected-js-sdk.json"
ORACLE = REAL_DIR / "js_oracle.cjs"
ROOT = HERE.parent
SDK_DIR = Path(os.environ.get("OPA_WASM_JS_DIR", str(ROOT / "var" / "opa-js")))

RBAC_DATA: dict[str, Any] = {"app": {"rbac": {
    "user_roles": {"alice": ["admin"], "bob": ["employee", "billing"], "eve": ["customer"]},
    "role_grants": {
        "customer": [{"action": "read", "type": "dog"}, {"action": "read", "type": "cat"}],
        "employee": [{"action": "read", "type": "dog"}, {"action": "update", "type": "dog"}],
        "billing": [{"action": "read", "type": "finance"}, {"action": "update", "type": "finance"}]}}}}
RBAC_DATA_2: dict[str, Any] = {"app": {"rbac": {"user_roles": {"eve": ["billing"]},
                                                "role_grants": {"billing": [{"action": "update", "type": "cat"}]}}}}

_MISSING: Any = object()  # "no input" in a case (JSON has no undefined)
RBAC_INPUTS: list[Any] = [{"user": "bob", "action": "read", "type": "finance"},
                          {"user": "bob", "action": "update", "type": "dog"},
                          {"user": "alice", "action": "delete", "type": "anything"},
                          {"user": "eve", "action": "update", "type": "cat"},
                          {"user": "mallory"}, {}, [1, 2], "text", None, _MISSING]
ECHO_INPUTS: list[Any] = [{"b": [1, 2.5, -3, 1e-7, 0.1], "a": {"x": None, "y": True}, "": ""},
                          "h\u00e9 \u2028 \U0001f600 \\ \"q\" \t\n\u0001", [], {}, 0, -1.25, False, True, None,
                          [[[]], [{}]], 2**53 + 1, _MISSING]


def _cases() -> list[dict[str, Any]]:
    """(module, data, entrypoint, input) combinations; inputs as JSON text, None = no input."""
    out: list[dict[str, Any]] = []
    for data_name in ("rbac", "rbac2"):
        for ep in ("app/rbac", "app/rbac/allow"):
            for doc in RBAC_INPUTS:
                out.append({"module": "rbac", "data": data_name, "entrypoint": ep, "input": _text(doc)})
    for ep in ("ok/echo", "ok/false", "ok/null", "ok/undefined"):
        for doc in ECHO_INPUTS if ep == "ok/echo" else [{"a": 1}, None, _MISSING]:
            out.append({"module": "sandbox", "data": "small", "entrypoint": ep, "input": _text(doc)})
    out.append({"module": "sandbox", "data": "small", "entrypoint": "ok/data", "input": _text(_MISSING)})
    out.append({"module": "sandbox", "data": "small", "entrypoint": "ok/data_path", "input": '{"key":"k"}'})
    out.append({"module": "sandbox", "data": "small", "entrypoint": "bad/abort", "input": "{}"})
    for ep, docs in REAL_INPUTS.items():
        for doc in docs:
            out.append({"module": "real", "data": "real", "entrypoint": ep, "input": _text(doc)})
    return out


REAL_DATA: dict[str, Any] = {"admin": "alice", "table": {"a": [1, 2.5, {"x": None}], "b": "\u00e9", "c": {}}}
REAL_INPUTS: dict[str, list[Any]] = {
    "real/echo": ECHO_INPUTS,
    "real/allow": [{"user": "alice"}, {"user": "bob"}, {"user": ["alice"]}, {}, "alice", None, _MISSING],
    "real/lookup": [{"key": "a"}, {"key": "b"}, {"key": "c"}, {"key": "zz"}, {"key": 1}, {}, _MISSING],
    "real/fmt": [{"name": "dev", "n": 7}, {"name": "h\u00e9", "n": -12}, {"name": "x"}, _MISSING],
    "real/conflict": [{}],
}
DATA: dict[str, Any] = {"rbac": RBAC_DATA, "rbac2": RBAC_DATA_2, "real": REAL_DATA,
                        "small": {"k": "v\u00e9", "n": [1, 2, {"z": None}]}}


def _text(doc: Any) -> str | None:
    """The JSON text the JS SDK gets (raw UTF-8, as its JSON.stringify would give); None = no input."""
    if doc is _MISSING:
        return None
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def _input(case: dict[str, Any]) -> Any:
    return NO_INPUT if case["input"] is None else json.loads(case["input"])


def _key(case: dict[str, Any]) -> str:
    return f"{case['module']}|{case['data']}|{case['entrypoint']}|{case['input']}"


def opa_link() -> Any:
    """``tests/policies/opa-real/opa_link.py``: policies linked against OPA's real runtime."""
    spec = importlib.util.spec_from_file_location("opa_link", REAL_DIR / "opa_link.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _modules(tmp: Path) -> dict[tuple[str, int], Path]:
    """The test policies as ABI 1.3 (opa_eval fast path) and ABI 1.1 (context path) modules:
    ``rbac``/``sandbox`` (hand-made runtime) and ``real`` (OPA v1.20.2's runtime, see opa_link.py)."""
    out = {}
    link = opa_link().link
    for name in ("rbac", "sandbox", "real"):
        for minor in (3, 1):
            path = tmp / f"{name}-1.{minor}.wasm"
            path.write_bytes(link(minor=minor) if name == "real" else build(name, minor=minor))
            out[(name, minor)] = path
    return out


def _run_js(module: Path, data: Any, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    job = {"module": str(module), "data": None if data is None else _text(data), "calls": calls}
    node = shutil.which("node")
    assert node is not None
    proc = subprocess.run([node, str(ORACLE), str(SDK_DIR)], input=json.dumps(job), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    assert len(results) == len(calls)
    return results


def _js_all(modules: dict[tuple[str, int], Path], minor: int) -> dict[str, Any]:
    """Run every case through the JS SDK on the ABI 1.<minor> modules; key -> {"ok": rs} | {"error": msg}."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for case in _cases():
        groups.setdefault((case["module"], case["data"]), []).append(case)
    out: dict[str, Any] = {}
    for (module, data_name), cases in groups.items():
        calls = [{"entrypoint": c["entrypoint"], "input": c["input"]} for c in cases]
        for case, res in zip(cases, _run_js(modules[(module, minor)], DATA[data_name], calls), strict=True):
            out[_key(case)] = res
    return out


def _sdk_available() -> bool:
    return shutil.which("node") is not None and (SDK_DIR / "node_modules" / "@open-policy-agent" /
                                                 "opa-wasm" / "package.json").is_file()


def _expected() -> dict[str, Any]:
    recorded: dict[str, Any] = json.loads(EXPECTED_FILE.read_text())
    return recorded


def _bundle(wasm: bytes, data: Any, entrypoints: list[str]) -> bytes:
    """A bundle shaped like ``opa build -t wasm`` writes it: leading '/', mode 0600, mtime 0."""
    manifest = {"revision": "", "roots": [""], "rego_version": 1,
                "wasm": [{"entrypoint": e, "module": "/policy.wasm"} for e in entrypoints]}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in (("/data.json", json.dumps(data).encode()), ("/policy.wasm", wasm),
                           ("/.manifest", json.dumps(manifest).encode())):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(blob), 0o600, 0
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


# Where the engine deliberately differs from the JS SDK: key -> (engine's result set, JS SDK's, why).
_BIG_INT = ([{"result": 2**53 + 1}], [{"result": 2**53}],
            "the JS SDK JSON.parses the result into doubles and rounds integers past 2^53; "
            "the engine keeps the runtime's exact decimal text (OPA numbers are arbitrary precision)")
KNOWN_DIVERGENCES: dict[str, tuple[list[Any], list[Any], str]] = {
    "sandbox|small|ok/echo|9007199254740993": _BIG_INT,
    "real|real|real/echo|9007199254740993": _BIG_INT,
}


def _engine_result(p: Policy, case: dict[str, Any]) -> dict[str, Any]:
    try:
        return {"ok": p.evaluate(_input(case), case["entrypoint"]).raw}
    except PolicyEvalError as exc:
        return {"error": str(exc), "code": exc.code}


def _agrees(got: dict[str, Any], want: dict[str, Any]) -> bool:
    if "error" in want:  # the JS SDK throws opa_abort's message; the engine wraps it, code "abort"
        return got.get("code") == "abort" and want["error"] in got.get("error", "")
    return "ok" in got and got["ok"] == want["ok"]


@pytest.fixture(scope="module")
def modules() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        yield _modules(Path(tmp))


@pytest.mark.parametrize("minor", [3, 1], ids=["abi1.3-opa_eval", "abi1.1-context"])
@pytest.mark.parametrize("fast_calls", [True, False], ids=["fast-calls", "public-api"])
@pytest.mark.parametrize("form", ["wasm", "bundle"])
def test_engine_matches_recorded_js_sdk(modules: dict[tuple[str, int], Path], minor: int, fast_calls: bool,
                                        form: str) -> None:
    expected = _expected()["results"]
    settings = PolicySettings(eval_deadline_ms=5000, fast_calls=fast_calls)
    policies: dict[tuple[str, str], Policy] = {}
    mismatches = []
    cases = _cases()
    assert len(expected) == len(cases), "expected-js-sdk.json is stale: re-record it"
    for case in cases:
        key = (case["module"], case["data"])
        if key not in policies:
            wasm = modules[(case["module"], minor)].read_bytes()
            data = DATA[case["data"]]
            if form == "bundle":
                eps = {"rbac": ["app/rbac", "app/rbac/allow"], "real": opa_link().ENTRYPOINTS}.get(
                    case["module"], ["ok/echo"])
                policies[key] = load_policy(_bundle(wasm, data, eps), settings=settings)
            else:
                policies[key] = load_policy(wasm, data=data, settings=settings)
            assert policies[key].fast_path == (minor >= 2)
        got = _engine_result(policies[key], case)
        want = expected[_key(case)]
        if _key(case) in KNOWN_DIVERGENCES:
            exact, js, _why = KNOWN_DIVERGENCES[_key(case)]
            assert want == {"ok": js}, "the recording no longer shows the known divergence"
            want = {"ok": exact}
        if not _agrees(got, want):
            mismatches.append((_key(case), got, want))
    assert not mismatches, mismatches[:5]


def test_data_replacement_matches_js_set_data(modules: dict[tuple[str, int], Path]) -> None:
    """Engine ``set_data`` (1.3 stash protocol, in place) vs the JS SDK's ``setData`` recording."""
    expected = _expected()["results"]
    p = load_policy(modules[("rbac", 3)].read_bytes(), data=RBAC_DATA,
                    settings=PolicySettings(eval_deadline_ms=5000))
    for data_name in ("rbac2", "rbac", "rbac2"):
        p.set_data(DATA[data_name])
        for case in _cases():
            if case["module"] == "rbac" and case["data"] == data_name:
                assert _agrees(_engine_result(p, case), expected[_key(case)]), _key(case)


@pytest.mark.parametrize(("module", "echo"), [("sandbox", "ok/echo"), ("real", "real/echo")])
def test_large_input_grows_memory_like_the_js_sdk(modules: dict[tuple[str, int], Path], module: str,
                                                  echo: str) -> None:
    """A 3 MB input is written past the initial memory (the host grows it first, as the JS SDK does)."""
    doc = {"blob": "x" * (3 * 1024 * 1024), "tail": [1, 2, 3]}
    for minor in (3, 1):
        p = load_policy(modules[(module, minor)].read_bytes(), data=REAL_DATA,
                        settings=PolicySettings(eval_deadline_ms=5000, max_output_bytes=8 * 1024 * 1024))
        for _ in range(3):
            assert p.evaluate(doc, echo).raw == [{"result": doc}]
        assert p.evaluate({"small": True}, echo).raw == [{"result": {"small": True}}]


@pytest.mark.parametrize("minor", [3, 1])
def test_real_runtime_data_updates_and_bounded_memory(modules: dict[tuple[str, int], Path], minor: int) -> None:
    """OPA's own allocator under the engine's data protocol: 1.3 reloads in place (stash clear, reset,
    parse, stash), older ABIs get a fresh instance; decisions follow the data, memory stays bounded."""
    p = load_policy(modules[("real", minor)].read_bytes(), data=REAL_DATA,
                    settings=PolicySettings(eval_deadline_ms=5000))
    first = p._idle[0]
    for i in range(60):
        admin = f"user{i}"
        p.set_data({"admin": admin, "table": {"k": "v" * (i * 97), "n": i}, "pad": ["x" * 300] * 20})
        assert p.evaluate({"user": admin}, "real/allow").raw == [{"result": True}]
        assert p.evaluate({"user": "alice"}, "real/allow").raw == [{"result": False}]
        assert p.evaluate({"key": "k"}, "real/lookup").raw == [{"result": "v" * (i * 97)}]
        assert p.evaluate({"key": "n"}, "real/lookup").raw == [{"result": i}]
    inst = p._idle[0]
    if minor >= 3:
        assert inst is first  # reloaded in place
    size = inst.memory.data_len(inst.store)
    for n in range(2000):
        assert p.evaluate({"name": f"d{n}", "n": n}, "real/fmt").raw == [{"result": f"d{n}/{n}"}]
        assert p.evaluate({"key": "n"}, "real/lookup").raw == [{"result": 59}]
    assert p._idle[0] is inst and inst.memory.data_len(inst.store) == size  # no growth per evaluation
    assert size <= 8 * 65536, size
    assert p.stats.errors == 0


def test_real_runtime_abort_discards_the_instance(modules: dict[tuple[str, int], Path]) -> None:
    p = load_policy(modules[("real", 3)].read_bytes(), data=REAL_DATA, settings=PolicySettings(eval_deadline_ms=5000))
    inst = p._idle[0]
    with pytest.raises(PolicyEvalError) as err:
        p.evaluate({}, "real/conflict")
    assert err.value.code == "abort" and "eval_conflict_error" in str(err.value)
    assert inst.broken and p.stats.instances_discarded == 1
    assert p.evaluate({"user": "alice"}, "real/allow").raw == [{"result": True}]  # a fresh instance
    assert p._idle[0] is not inst


def _has_object(doc: Any) -> bool:
    return isinstance(doc, dict) or (isinstance(doc, list) and any(_has_object(d) for d in doc))


def test_hand_made_runtime_round_trips_like_opas(modules: dict[tuple[str, int], Path]) -> None:
    """Fidelity of agent_devkit/opa/opa_rt.c: its JSON round trip gives what OPA's real runtime gives."""
    settings = PolicySettings(eval_deadline_ms=5000)
    ours = load_policy(modules[("sandbox", 3)].read_bytes(), settings=settings)
    opas = load_policy(modules[("real", 3)].read_bytes(), settings=settings)
    for doc in [*ECHO_INPUTS, RBAC_DATA, [0, -0.0, 1.0, 1e300, 2.5e-8, 0.1, 123456789012345678901234567890],
                "h\u00e9\u2028\U0001f600\u0001\"\\/"]:
        arg = NO_INPUT if doc is _MISSING else doc
        mine, real = ours.evaluate_raw(arg, "ok/echo")[1], opas.evaluate_raw(arg, "real/echo")[1]
        assert json.loads(mine) == json.loads(real), doc
        if not _has_object(doc):  # byte for byte (number text, escapes); OPA orders object keys by hash
            assert mine == real, doc


@pytest.mark.skipif(not _sdk_available(), reason="node or @open-policy-agent/opa-wasm not installed "
                    "(npm install --prefix var/opa-js @open-policy-agent/opa-wasm@1.10.0)")
def test_js_sdk_live_agrees(modules: dict[tuple[str, int], Path]) -> None:
    """Re-run the official JS SDK on today's module bytes: it must still give the recorded results."""
    expected = _expected()["results"]
    for minor in (3, 1):
        live = _js_all(modules, minor)
        diff = [(k, live[k], expected[k]) for k in expected if live[k] != expected[k]]
        assert not diff, (minor, diff[:5])


def _real_cases() -> list[Path]:
    return sorted(REAL_DIR.glob("*.cases.json"))


@pytest.mark.skipif(not _real_cases(), reason="no complete opa-built module in tests/policies/opa-real/ "
                    "(none is obtainable from the reachable registries; see the README there)")
@pytest.mark.parametrize("fast_calls", [True, False])
def test_real_opa_modules(fast_calls: bool) -> None:
    """NAME.cases.json: {"artifact": "NAME.wasm"|"NAME.tar.gz", "data": {...}|null,
    "cases": [{"entrypoint": "...", "input": <JSON>|absent, "expected": <result set>}]}."""
    for spec_path in _real_cases():
        spec = json.loads(spec_path.read_text())
        p = load_policy(REAL_DIR / spec["artifact"], data=spec.get("data"),
                        settings=PolicySettings(eval_deadline_ms=5000, fast_calls=fast_calls))
        for case in spec["cases"]:
            doc = case.get("input", NO_INPUT)
            assert p.evaluate(doc, case["entrypoint"]).raw == case["expected"], (spec_path.name, case)


def record() -> None:
    """Run the JS SDK over every case (ABI 1.3 and 1.1 must agree) and write expected-js-sdk.json."""
    if not _sdk_available():
        raise SystemExit(f"install the JS SDK first: npm install --prefix {SDK_DIR} @open-policy-agent/opa-wasm@1.10.0")
    with tempfile.TemporaryDirectory() as tmp:
        mods = _modules(Path(tmp))
        fast, ctx = _js_all(mods, 3), _js_all(mods, 1)
        if fast != ctx:
            raise SystemExit(f"JS SDK fast path and context path disagree: "
                             f"{[k for k in fast if fast[k] != ctx[k]][:5]}")
    sdk = json.loads((SDK_DIR / "node_modules" / "@open-policy-agent" / "opa-wasm" / "package.json").read_text())
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=True).stdout.strip()
    doc = {"oracle": f"@open-policy-agent/opa-wasm {sdk['version']} on node {node}",
           "note": "recorded by tests/test_policy_real_opa.py record; keys: module|data|entrypoint|input JSON",
           "results": fast}
    EXPECTED_FILE.write_text(json.dumps(doc, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {len(fast)} results to {EXPECTED_FILE}")


if __name__ == "__main__":
    if sys.argv[1:] == ["record"]:
        record()
    else:
        raise SystemExit("usage: python -m tests.test_policy_real_opa record")
