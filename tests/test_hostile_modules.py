"""A module cannot brick itself (or poison what is forwarded) with its own output (issue 11: defects 6, 9).

Modules here are real Wasm: a WASI command that writes fixed bytes to stdout, assembled from WAT.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from hypothesis import given
from hypothesis import strategies as st

from agent import clock, jsonsafe
from agent.runtime.contract import ModuleOutputInvalid, parse_output
from agent.runtime.modules import ModuleRunFailed, ModuleRuntime
from agent.storage import Store
from agent_devkit.hostile import json_values, render, with_hostile_leaf
from tests.modules.support import load, make_runtime, rows


def printer(out: bytes) -> bytes:
    """A module whose every run writes ``out`` on stdout and exits 0."""
    data = "".join(f"\\{b:02x}" for b in out)
    pages = max(1, -(-(len(out) + 64) // 65536))
    wat = f"""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") {pages})
      (data (i32.const 64) "{data}")
      (func (export "_start")
        (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const {len(out)}))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""
    return bytes(wasmtime.wat2wasm(wat))


def runs(store: Store, name: str) -> list[tuple[int, str, str]]:
    return [(int(v), str(o), str(e)) for v, o, e in rows(
        store, "SELECT version, outcome, error FROM module_runs WHERE name = ? ORDER BY id", name)]


def life(tmp_path: Path, body: Any) -> Any:
    async def go() -> Any:
        store, rt = make_runtime(tmp_path / "state")
        try:
            return await body(store, rt)
        finally:
            await rt.close()
            store.close()
    return asyncio.run(go())


def test_a_non_finite_state_is_refused_and_the_next_version_still_runs(tmp_path: Path) -> None:
    """Defect 6: {"state": 1e400} was stored as Infinity; every later run, even of a new version, then
    failed (its input could not be encoded)."""
    async def body(store: Store, rt: ModuleRuntime) -> None:
        await load(rt, "m", printer(b'{"state": 1}'), version=1)
        assert (await rt.run("m")).state == 1
        await load(rt, "m", printer(b'{"state": 1e400}'), version=2)
        with pytest.raises(ModuleRunFailed) as info:
            await rt.run("m")
        assert info.value.outcome == "output_invalid" and "json_non_finite" in str(info.value)
        await load(rt, "m", printer(b'{"state": {"n": 3}}'), version=3)
        assert (await rt.run("m")).state == {"n": 3}
        assert (await rt.run("m")).state == {"n": 3}
        assert [(v, o) for v, o, _ in runs(store, "m")] == [(1, "ok"), (2, "output_invalid"), (3, "ok"), (3, "ok")]
        assert rows(store, "SELECT state FROM module_state WHERE name = 'm'") == [('{"n":3}',)]
    life(tmp_path, body)


@pytest.mark.parametrize("out", [
    b'{"state": ' + b"7" * 5000 + b"}",
    b'{"telemetry": [{"device": "d", "metric": "m", "value": ' + b"7" * 5000 + b"}]}",
    b'{"telemetry": [{"device": "d", "metric": "m", "value": ' + b"9" * 309 + b"}]}",
    b'{"actuations": [{"topic": "factory/l1/fan/set", "payload": 1e400}]}',
    b'{"actuations": [{"topic": "factory/l1/fan/set", "payload": {"speed": NaN}}]}',
    b'{"events": [{"severity": "info", "type": "t", "message": "\\ud800"}]}',
    b'{"state": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"state": 1, "state": 2}',
])
def test_every_hostile_output_is_a_recorded_output_invalid_run(tmp_path: Path, out: bytes) -> None:
    """Defects 6 and 9: a 5,000-digit integer gave module_run_internal_error and no module_runs row (a
    health window could not see it); payload 1e400 in an actuation reached the decision log."""
    async def body(store: Store, rt: ModuleRuntime) -> None:
        await load(rt, "m", printer(out))
        delivered: list[Any] = []

        async def sink(output: Any) -> None:
            delivered.append(output)
        rt.set_sink(sink)
        with pytest.raises(ModuleRunFailed) as info:
            await rt.run("m")
        assert info.value.outcome == "output_invalid"
        await rt.run_triggered("m", {"kind": "manual"}, [])  # the triggered path records it the same way
        assert delivered == []
        assert [o for _, o, _ in runs(store, "m")] == ["output_invalid", "output_invalid"]
        assert rows(store, "SELECT count(*) FROM module_state") == [(0,)]
    life(tmp_path, body)


def test_a_host_side_failure_still_leaves_a_run_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every run, failing or not, leaves a row a health window sees, even when the host itself fails."""
    async def body(store: Store, rt: ModuleRuntime) -> None:
        await load(rt, "m", printer(b"{}"))

        def broken(*_a: Any, **_k: Any) -> Any:
            raise RuntimeError("simulated host bug")
        monkeypatch.setattr(rt.runner, "execute", broken)
        with pytest.raises(ModuleRunFailed) as info:
            await rt.run("m")
        assert info.value.outcome == "internal_error" and info.value.run_id is not None
        assert await rt.run_triggered("m", {"kind": "manual"}, []) is None
        assert [(o, "simulated host bug" in e) for _, o, e in runs(store, "m")] == [("internal_error", True)] * 2
    life(tmp_path, body)


def test_a_poisoned_saved_state_from_an_older_agent_is_discarded_not_fatal(tmp_path: Path) -> None:
    """A state stored before this fix (Infinity) made every run input_invalid for ever; now it is dropped
    with a recorded error and the module runs from a null state."""
    async def body(store: Store, rt: ModuleRuntime) -> None:
        await store.writer.run(lambda db: db.execute(
            "INSERT INTO module_state (name, state, version, updated_wall) VALUES ('m', '{\"t\": Infinity}', 1, 0)"))
        await load(rt, "m", printer(b'{"state": "fresh"}'))
        assert (await rt.run("m")).state == "fresh"
        assert [o for _, o, _ in runs(store, "m")] == ["ok"]
        assert [c for (c,) in rows(store, "SELECT code FROM errors WHERE component = 'modules'")] == [
            "module_state_discarded"]
    life(tmp_path, body)


# ---- properties of the output parser ---------------------------------------------------------------

OUTPUTS = st.one_of(
    st.fixed_dictionaries({}, optional={
        "state": json_values(10),
        "telemetry": st.lists(st.fixed_dictionaries({"device": st.text(max_size=4), "metric": st.text(max_size=4),
                                                     "value": json_values(1)}), max_size=3),
        "actuations": st.lists(st.fixed_dictionaries({"topic": st.text(max_size=8), "payload": json_values(6)}),
                               max_size=3),
        "properties": st.lists(st.fixed_dictionaries({"device": st.text(max_size=4), "name": st.text(max_size=4),
                                                      "value": json_values(1)}), max_size=3),
    }).map(lambda d: json.dumps(d).encode()),
    with_hostile_leaf(st.fixed_dictionaries({"state": json_values(6)})).map(lambda t: render(t).encode()),
    with_hostile_leaf(st.fixed_dictionaries({"actuations": st.just([{"topic": "a/b", "payload": {"x": 1}}])})).map(
        lambda t: render(t).encode()),
    st.binary(max_size=200),
)


@given(OUTPUTS)
def test_any_output_is_valid_and_storable_or_output_invalid(raw: bytes) -> None:
    try:
        out = parse_output(raw, name="m", version=1, trigger={}, max_items=10, state_limit_bytes=4096)
    except ModuleOutputInvalid:
        return
    limits = jsonsafe.Limits(1 << 20)
    if out.state_set:
        assert out.state_json is not None
        assert jsonsafe.loads(out.state_json.encode(), limits) == out.state
    for act in out.actuations:
        jsonsafe.loads(jsonsafe.dumps(act.payload).encode(), limits)  # strict both ways
    for t in out.telemetry:
        assert abs(float(t["value"])) < float("inf")


def test_a_non_finite_actuation_never_reaches_the_decision_log_or_the_cloud(tmp_path: Path) -> None:
    """Defect 9: payload 1e400 in an actuation put Infinity into decisions.input and into the audit batch
    the cloud receives, where a strict parser rejects the whole batch."""
    from agent.config.pipeline import PipelineSettings
    from agent.control.pipeline import Pipeline
    from agent.sync.outbox import OutboxError, make_record

    async def body(store: Store, rt: ModuleRuntime) -> None:
        pipeline = Pipeline(store, PipelineSettings(no_policy="allow"), "node", publisher=None, policies=None)
        handled: list[str] = []

        async def sink(output: Any) -> None:
            handled.append(output.name)
            await pipeline.sink(output)
        rt.set_sink(sink)
        await load(rt, "bad", printer(b'{"actuations": [{"topic": "factory/l1/fan/set", "payload": 1e400}]}'))
        await load(rt, "good", printer(b'{"actuations": [{"topic": "factory/l1/fan/set", "payload": {"on": 1}}]}'))
        for name in ("bad", "good"):
            await rt.run_triggered(name, {"kind": "manual"}, [])
        await pipeline.drain()
        assert handled == ["good"]
        for (text,) in rows(store, "SELECT input FROM decisions"):
            jsonsafe.loads(text.encode(), jsonsafe.Limits(1 << 20))  # strict, every one
    life(tmp_path, body)
    stamp = clock.now()
    with pytest.raises(OutboxError, match="no NaN or Infinity"):  # the last check before the cloud
        make_record("events", '{"payload": Infinity}', "k", stamp)
    with pytest.raises(OutboxError, match="strict JSON"):
        make_record("events", {"payload": float("inf")}, "k", stamp)


def test_a_policy_result_that_is_not_strict_json_fails_the_evaluation() -> None:
    """Policy results are stored in the decision log and forwarded: a real guest echoing 1e400 (its
    runtime parses it; Python would read it as infinity) is a failed evaluation, so the gate denies."""
    from agent.policy.engine import load_policy
    from agent.policy.errors import PolicyEvalError
    from agent_devkit.fleet import sandbox_wasm

    policy = load_policy(sandbox_wasm(), name="echo", version=1)
    rs, _ = policy.evaluate_json(b'{"x": 123456789012345678901234567890}', "ok/echo")  # Rego numbers: big
    assert rs.raw == [{"result": {"x": 123456789012345678901234567890}}]
    with pytest.raises(PolicyEvalError) as info:
        policy.evaluate_json(b'{"x": 1e400}', "ok/echo")
    assert info.value.code == "bad_result" and "json_non_finite" in str(info.value)
