"""Workload modules: real Wasm (C built with clang, WAT) run in the sandbox, recorded in real SQLite."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from agent.messaging import topics
from agent.runtime.contract import ModuleOutput, ModuleOutputInvalid, build_input, make_trigger, parse_output
from agent.runtime.modules import ModuleRunFailed
from agent.runtime.registry import ModuleNotLoaded
from agent.runtime.spec import ModuleSpecInvalid, parse_spec
from agent.storage import Store
from agent_devkit.examples import example, test_module
from tests.modules.support import load, make_runtime, rows, sha

THERMO_CONFIG = {"metric": "temp", "high": 30.0, "low": 27.0, "actuator_prefix": "actuators"}


def reading(device: str, value: float, metric: str = "temp", wall: float = 1_700_000_000.0) -> dict[str, Any]:
    line, sensor = device.split("/")
    return {"device": device, "metric": metric, "value": value, "wall": wall,
            "topic": f"factory/{line}/{sensor}/{metric}"}


def thermo_predicate(**extra: Any) -> dict[str, Any]:
    return {"kind": "module", "name": "thermostat", "version": 1, "config": THERMO_CONFIG, **extra}


def test_thermostat_hysteresis_saved_state_survives_restart(tmp_path: Path) -> None:
    async def first_life() -> list[ModuleOutput]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "thermostat", example("thermostat"), thermo_predicate())
            outs = [await rt.run("thermostat", readings=[reading("l1/oven", v), reading("l1/press", 20.0)])
                    for v in (31.5, 28.0)]
            await rt.close()
            return outs
        finally:
            store.close()

    hot, between = asyncio.run(first_life())
    assert [(a.topic, a.payload["fan"]) for a in hot.actuations] == [("actuators/l1/oven/fan", "on")]
    assert hot.events[0]["type"] == "overheat" and hot.events[0]["severity"] == "warning"
    props = {(p.device, p.name): (p.value, p.type) for p in hot.properties}
    assert props[("l1/oven", "fan")] == ("on", "string")
    assert props[("l1/oven", "temp")] == (31.5, "float")
    assert props[("l1/press", "fan")] == ("off", "string")
    assert between.actuations == []  # 28 is inside the hysteresis band: the fan stays on
    assert {(p.device, p.name): p.value for p in between.properties}[("l1/oven", "fan")] == "on"

    async def second_life() -> tuple[ModuleOutput, ModuleOutput]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "thermostat", example("thermostat"), thermo_predicate())
            still = await rt.run("thermostat", readings=[reading("l1/oven", 28.0)])
            cool = await rt.run("thermostat", readings=[reading("l1/oven", 26.5)])
            return still, cool
        finally:
            store.close()

    still, cool = asyncio.run(second_life())
    assert still.actuations == []  # the saved state (fan on) came back from SQLite
    assert [a.payload["fan"] for a in cool.actuations] == ["off"]
    assert cool.events[0]["type"] == "cooled"
    store = Store.open(tmp_path)
    try:
        (state,) = rows(store, "SELECT state FROM module_state WHERE name = 'thermostat'")
        assert json.loads(state[0]) == {"runs": 4, "on": {"l1/oven": False, "l1/press": False}}
        outcomes = rows(store, "SELECT outcome, readings FROM module_runs WHERE name = 'thermostat' ORDER BY id")
        assert outcomes == [("ok", 2), ("ok", 2), ("ok", 1), ("ok", 1)]
    finally:
        store.close()


def test_moving_average_derives_telemetry(tmp_path: Path) -> None:
    async def go() -> ModuleOutput:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "avg", example("moving_avg"), {"config": {"metric": "temp"}})
            readings = [reading("l1/oven", v, wall=1000.0 + i) for i, v in enumerate((20.0, 22.0, 27.0))]
            readings.append(reading("l1/oven", 99.0, metric="rpm"))
            return await rt.run("avg", readings=readings)
        finally:
            store.close()

    out = asyncio.run(go())
    tel = {t["metric"]: t["value"] for t in out.telemetry}
    assert tel == {"temp_avg": 23.0, "temp_min": 20.0, "temp_max": 27.0}
    assert out.state == {"readings_total": 3}


def test_wat_counter_and_code_cache(tmp_path: Path) -> None:
    wasm = example("counter")

    async def life() -> tuple[str, list[Any]]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "counter", wasm)
            loaded = rt.registry.get("counter")
            assert loaded is not None
            outs = [await rt.run("counter") for _ in range(2)]
            return loaded.source, [o.state for o in outs]
        finally:
            store.close()

    source1, states1 = asyncio.run(life())
    source2, states2 = asyncio.run(life())
    assert source1 == "compiled" and source2 == "cache"  # the second start runs precompiled code
    assert states1 == [1, 2] and states2 == [3, 4]


MALICIOUS = [
    ("loop", "timeout", "deadline"),
    ("membomb", "memory_limit", "memory"),
    ("cbomb", "memory_limit", "memory"),
    ("trap", "trap", "unreachable"),
    ("exit3", "exit_nonzero", "status 3"),
    ("garbage", "output_invalid", "not one JSON document"),
    ("badtypes", "output_invalid", "not a publishable MQTT topic"),
    ("huge", "output_too_large", "bytes on stdout"),
    # sleeping in poll_oneoff would outlast the deadline (the host call is not interruptible): refused,
    # so the module sees an error and traps at once instead of holding a thread for 30 s
    ("sleeper", "trap", "unreachable"),
    ("tablebomb", "instantiate_failed", "could not be instantiated"),
]


@pytest.mark.parametrize(("module", "outcome", "needle"), MALICIOUS)
def test_malicious_module_is_stopped_and_recorded(tmp_path: Path, module: str, outcome: str, needle: str) -> None:
    async def go() -> tuple[ModuleRunFailed, ModuleOutput]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "bad", test_module(module))
            await load(rt, "counter", example("counter"))
            with pytest.raises(ModuleRunFailed) as info:
                await rt.run("bad")
            good = await rt.run("counter")  # the runtime and other modules carry on
            again = await rt.run("counter")
            assert again.state == 2
            return info.value, good
        finally:
            store.close()

    failed, good = asyncio.run(go())
    assert failed.outcome == outcome
    assert needle in str(failed)
    assert good.state == 1
    store = Store.open(tmp_path)
    try:
        runs = rows(store, "SELECT id, name, outcome, error FROM module_runs ORDER BY id")
        assert [(r[1], r[2]) for r in runs] == [("bad", outcome), ("counter", "ok"), ("counter", "ok")]
        assert runs[0][0] == failed.run_id and needle in runs[0][3]
        errors = rows(store, "SELECT component, code, message FROM errors WHERE component = 'modules'")
        assert [(c, code) for c, code, _ in errors] == [("modules", f"module_{outcome}")]
        assert rows(store, "SELECT count(*) FROM module_state WHERE name = 'bad'") == [(0,)]
    finally:
        store.close()


def probe_event(out: ModuleOutput) -> dict[str, Any]:
    (event,) = out.events
    return event


def test_no_filesystem_or_env_unless_declared_and_allowed(tmp_path: Path) -> None:
    declared = {"permissions": {"filesystem": True, "env": {"PROBE_TOKEN": "42"}}}

    async def go(predicate: dict[str, Any], **kw: Any) -> dict[str, Any]:
        store, rt = make_runtime(tmp_path / str(len(kw)) / str(bool(predicate)), **kw)
        try:
            await load(rt, "probe", test_module("probe"), predicate)
            return probe_event(await rt.run("probe"))
        finally:
            store.close()

    default = asyncio.run(go({}))
    assert (default["passwd"], default["root"], default["scratch"], default["env"]) == \
        ("denied", "denied", "denied", "unset")
    not_allowed = asyncio.run(go(declared))  # declared by the release, not allowed by the gateway
    assert (not_allowed["scratch"], not_allowed["env"]) == ("denied", "unset")
    allowed = asyncio.run(go(declared, allow_filesystem=True, allow_env=True))
    assert (allowed["scratch"], allowed["env"]) == ("read", "set")
    assert (allowed["passwd"], allowed["root"]) == ("denied", "denied")  # only its own scratch dir


def test_swap_waits_for_the_run_in_flight(tmp_path: Path) -> None:
    async def go() -> list[Any]:
        store, rt = make_runtime(tmp_path)
        try:
            counter, avg = example("counter"), example("moving_avg")
            await load(rt, "m", counter)
            order: list[Any] = []
            async with rt.registry.using("m") as held:  # a run in flight on v1
                swap = asyncio.create_task(rt.load_release("m", 2, sha(avg), avg, {"config": {"metric": "temp"}}))
                for _ in range(50):
                    await asyncio.sleep(0.01)
                    if swap.done():
                        break
                order.append(("swap_done_during_run", swap.done()))
                order.append(("held_version", held.version))
            await swap
            loaded = rt.registry.get("m")
            assert loaded is not None
            order.append(("active_after", loaded.version))
            out = await rt.run("m", readings=[reading("l1/oven", 25.0)])
            order.append(("next_run_version", out.version, out.telemetry[0]["metric"]))
            return order
        finally:
            store.close()

    assert asyncio.run(go()) == [("swap_done_during_run", False), ("held_version", 1), ("active_after", 2),
                                 ("next_run_version", 2, "temp_avg")]


def test_topic_trigger_batches_readings_and_feeds_the_sink(tmp_path: Path) -> None:
    async def go() -> tuple[list[ModuleOutput], int, int]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "thermostat", example("thermostat"), thermo_predicate(
                trigger={"type": "topic", "topics": ["factory/+/+/temp"], "batch_window_ms": 100}))
            got: list[ModuleOutput] = []
            done = asyncio.Event()

            async def sink(out: ModuleOutput) -> None:
                got.append(out)
                done.set()

            rt.set_sink(sink)
            queued = rt.offer([reading("l1/oven", 25.0), reading("l1/oven", 31.0), reading("l2/press", 22.0),
                               reading("l1/oven", 99.0, metric="rpm")])
            await asyncio.wait_for(done.wait(), 10)
            await asyncio.sleep(0.3)  # nothing else is pending: no second run may follow
            ignored = rt.offer([{"topic": "other/x", "device": "a/b", "metric": "temp", "value": 1, "wall": 1.0}])
            await rt.close()
            return got, queued, ignored
        finally:
            store.close()

    got, queued, ignored = asyncio.run(go())
    assert queued == 3 and ignored == 0
    assert len(got) == 1
    (out,) = got
    assert out.trigger["kind"] == "topic" and out.trigger["batch"] == 3
    assert [a.payload["fan"] for a in out.actuations] == ["on"]  # newest l1/oven value 31 >= 30


def test_unknown_module_and_invalid_spec(tmp_path: Path) -> None:
    async def go() -> None:
        store, rt = make_runtime(tmp_path)
        try:
            with pytest.raises(ModuleNotLoaded, match="no module named 'nope'"):
                await rt.run("nope")
            with pytest.raises(ModuleSpecInvalid, match=r"trigger\.topics"):
                await load(rt, "x", example("counter"), {"trigger": {"type": "topic", "topics": ["a/#/b"]}})
            assert rt.registry.get("x") is None
        finally:
            store.close()

    asyncio.run(go())


@pytest.mark.parametrize(("predicate", "needle"), [
    ({"trigger": {"type": "sometimes"}}, "trigger.type"),
    ({"trigger": {"type": "schedule"}}, "trigger.schedule"),
    ({"trigger": {"type": "schedule", "schedule": {"interval_s": 0}}}, "interval_s"),
    ({"trigger": {"type": "schedule", "schedule": {"cron": "61 * * * *"}}}, "not valid"),
    ({"trigger": {"type": "schedule", "schedule": {"cron": "* * *"}}}, "5-field"),
    ({"trigger": {"type": "topic", "topics": []}}, "non-empty list"),
    ({"trigger": {"type": "topic", "topics": ["a/+"], "batch_window_ms": -1}}, "batch_window_ms"),
    ({"config": [1]}, "config must be a JSON object"),
    ({"permissions": {"env": {"1BAD": "x"}}}, "permissions.env"),
    ({"readings": {"topics": ["a/#"], "window_s": 0}}, "readings.window_s"),
])
def test_spec_errors_name_the_field(predicate: dict[str, Any], needle: str) -> None:
    with pytest.raises(ModuleSpecInvalid, match=needle.replace(".", r"\.")):
        parse_spec(predicate)


def test_spec_reads_every_documented_field() -> None:
    spec = parse_spec({"trigger": {"type": "mixed", "schedule": {"cron": "*/5 * * * *"}, "topics": ["factory/#"],
                                   "batch_window_ms": 50},
                       "readings": {"topics": ["factory/+/+/temp"], "window_s": 60, "max": 10},
                       "config": {"a": 1}, "limits": {"deadline_ms": 200, "memory_mb": 8, "stdout_bytes": 1000},
                       "permissions": {"filesystem": True, "env": {"K": "v"}}})
    assert spec.schedule is not None and spec.schedule.cron == "*/5 * * * *"
    assert spec.topics == ("factory/#",) and spec.batch_window_ms == 50
    assert spec.readings is not None and spec.readings.max == 10 and spec.readings.window_s == 60
    assert (spec.deadline_ms, spec.memory_mb, spec.stdout_bytes) == (200, 8, 1000)
    assert spec.filesystem and spec.env == (("K", "v"),)


def test_module_triggers_match_topics_as_the_bus_does() -> None:
    """One matcher: a trigger filter means what the same subscription means on the broker, including
    MQTT's rule that a wildcard at the first level never matches a '$' topic (the runtime's own matcher
    used to let '#' and '+/…' triggers take '$SYS/…' readings)."""
    assert topics.matches("factory/+/+/temp", "factory/l1/oven/temp")
    assert not topics.matches("factory/+/+/temp", "factory/l1/oven/rpm")
    assert topics.matches("factory/#", "factory")
    assert topics.matches("factory/#", "factory/a/b/c")
    assert not topics.matches("factory/+", "factory/a/b")
    assert not topics.matches("#", "$SYS/broker/load")
    assert not topics.matches("+/broker/load", "$SYS/broker/load")


def test_a_catch_all_trigger_does_not_take_dollar_topics(tmp_path: Path) -> None:
    """A module triggered by '#' gets every reading, except those of '$' topics (broker internals)."""
    async def go() -> tuple[int, int]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "all", test_module("garbage"), {"kind": "module", "name": "all", "version": 1,
                                                           "trigger": {"type": "topic", "topics": ["#"]}})
            row = {"device": "d", "metric": "m", "value": 1, "wall": 1.0}
            dollar = rt.offer([{**row, "topic": "$SYS/broker/load"}])
            plain = rt.offer([{**row, "topic": "factory/l1/s1/m"}])
            await rt.close()
            return dollar, plain
        finally:
            store.close()

    assert asyncio.run(go()) == (0, 1)


def parse(doc: Any, **kw: Any) -> ModuleOutput:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return parse_output(raw, name="m", version=1, trigger={}, max_items=kw.get("max_items", 5),
                        state_limit_bytes=kw.get("state_limit", 100))


@pytest.mark.parametrize(("raw", "needle"), [
    (b"", "wrote nothing"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"state": NaN}', "NaN"),
    (b"[1]", "must be a JSON object"),
    (b'{"a": 1} {"b": 2}', "not one JSON document"),
    ({"propertys": []}, "unknown keys"),
    ({"properties": [{"device": "d", "name": "n", "value": "x", "type": "float"}]}, "not a valid float"),
    ({"properties": [{"device": "d", "name": "n", "value": True, "type": "int"}]}, "not a valid int"),
    ({"properties": [{"device": "", "name": "n", "value": "x"}]}, "must not be empty"),
    ({"actuations": [{"topic": "a/+/b", "payload": 1}]}, "not a publishable"),
    ({"actuations": [{"topic": "a/b"}]}, "no payload"),
    ({"events": [{"severity": "fatal", "type": "t", "message": "m"}]}, "severity"),
    ({"telemetry": [{"device": "d", "metric": "m", "value": "1"}]}, "finite number"),
    ({"telemetry": [{}] * 6}, "6 entries"),
    ({"state": "x" * 200}, "saved state is"),
    ({"actuations": {"topic": "a"}}, "must be a list"),
    (b'\xef\xbb\xbf{"state": 1}', "BOM"),
    ({"properties": [{"device": "d", "name": "n", "value": 1, "unit": "C"}]}, r"unknown keys \['unit'\]"),
    ({"properties": [{"device": "d", "name": "x" * 5000, "value": 1, "type": "int"}]}, "name is 5000 characters"),
    ({"properties": [{"device": "d", "name": "n", "value": "v" * 5000}]}, "value is 5000 characters"),
    ({"properties": [{"device": 7, "name": "n", "value": 1, "type": "int"}]}, "device must be a string"),
    ({"properties": [{"device": "d", "name": "n", "value": 1.5, "type": "integer"}]}, "not a valid integer"),
    ({"properties": [{"device": "d", "name": "n", "value": 1, "type": "boolean"}]}, "not a valid boolean"),
])
def test_output_validation_is_strict(raw: Any, needle: str) -> None:
    with pytest.raises(ModuleOutputInvalid, match=needle):
        parse(raw)


def test_valid_output_and_input_trimming() -> None:
    out = parse({"properties": [{"device": "d", "name": "n", "value": 1.5, "type": "float"}],
                 "actuations": [{"topic": "a/b", "payload": {"x": 1}}],
                 "events": [{"severity": "info", "type": "t", "message": "", "extra": 1}],
                 "telemetry": [{"device": "d", "metric": "m", "value": 2}], "state": {"k": 1}})
    assert out.summary() == {"properties": 1, "actuations": 1, "events": 1, "telemetry": 1}
    assert out.state_set and out.state == {"k": 1}
    assert out.state_json == '{"k":1}'  # measured against the limit, then stored as is
    assert not parse({}).state_set and parse({}).state_json is None
    assert parse({"state": None}).state_json == "null"
    typed = parse({"properties": [{"device": "d", "name": "a", "value": True, "type": "boolean"},
                                  {"device": "d", "name": "b", "value": 3, "type": "integer"},
                                  {"device": "d", "name": "c", "value": ""}]}).properties
    assert [(p.name, p.value, p.type) for p in typed] == [("a", True, "boolean"), ("b", 3, "integer"),
                                                          ("c", "", "string")]
    readings = [{"device": "a/b", "metric": "t", "value": float(i), "wall": 1.0, "topic": "f/a/b/t"}
                for i in range(100)]
    data, kept = build_input(make_trigger("manual", 0.0), readings, {}, None, 2000)  # type: ignore[arg-type]
    assert len(data) <= 2000 and 0 < kept < 100
    doc = json.loads(data)
    assert doc["readings"][-1]["value"] == 99.0  # the newest readings are the ones kept
    assert list(doc) == ["trigger", "readings", "config", "state"]




def _doc_json_after(text: str, lead: str) -> Any:
    start = text.index("```json\n", text.index(lead)) + len("```json\n")
    return json.loads(text[start:text.index("```", start)])


def test_documented_worked_example_is_what_the_module_does(tmp_path: Path) -> None:
    """The input/output pair for thermostat.wasm in docs/authoring.md is checked against a real run."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "authoring.md").read_text()
    doc_in = _doc_json_after(doc, "the module runs with")
    doc_out = _doc_json_after(doc, "and answers")
    meta = _doc_json_after(doc, "Sign and install it with a trigger")
    assert meta["config"] == doc_in["config"]

    async def go() -> ModuleOutput:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "thermostat", example("thermostat"), {**meta, "kind": "module", "name": "thermostat"})
            return await rt.run("thermostat", trigger=doc_in["trigger"], readings=doc_in["readings"])
        finally:
            store.close()

    out = asyncio.run(go())
    assert [{"topic": a.topic, "payload": a.payload} for a in out.actuations] == doc_out["actuations"]
    assert out.events == doc_out["events"]
    assert [p.__dict__ for p in out.properties] == doc_out["properties"]
    assert out.state == doc_out["state"]


def test_status_lists_modules_and_failed_runs(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.daemon.status import collect

    async def go() -> None:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "counter", example("counter"))
            await load(rt, "bad", test_module("trap"))
            await rt.run("counter")
            with pytest.raises(ModuleRunFailed):
                await rt.run("bad")
        finally:
            store.close()

    asyncio.run(go())
    report = collect(AgentConfig().with_state_dir(tmp_path))
    mods = {m["name"]: m for m in report["modules"]}
    assert (mods["counter"]["last_outcome"], mods["counter"]["runs_24h"]) == ("ok", 1)
    assert (mods["bad"]["last_outcome"], mods["bad"]["failed_24h"]) == ("trap", 1)
    assert any("module 'bad'" in p and "trap" in p for p in report["problems"])


def test_concurrent_runs_are_serialized_per_module_and_trial_saves_nothing(tmp_path: Path) -> None:
    async def go() -> tuple[list[Any], list[Any], Any, Any]:
        store, rt = make_runtime(tmp_path)
        try:
            await load(rt, "c1", example("counter"))
            await load(rt, "c2", example("counter"))
            results = await asyncio.gather(*(rt.run(name) for _ in range(10) for name in ("c1", "c2")))
            c1 = sorted(o.state for o in results if o.name == "c1")
            c2 = sorted(o.state for o in results if o.name == "c2")
            wasm = example("counter")
            candidate = await rt.prepare("c1", 2, sha(wasm), wasm, {})
            trial = await rt.trial(candidate)
            after = await rt.run("c1")
            return c1, c2, trial, after
        finally:
            store.close()

    c1, c2, trial, after = asyncio.run(go())
    assert c1 == list(range(1, 11)) and c2 == list(range(1, 11))  # no lost update of the saved state
    assert trial.state == 11 and trial.version == 2 and trial.trigger["kind"] == "trial"
    assert after.state == 11 and after.version == 1  # the trial neither saved state nor swapped


def test_stdin_temp_file_fallback_and_oversized_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C API's bytes-stdin (another wasmtime-py version), stdin goes through a temp file."""
    from agent.wasm import wasi_io

    monkeypatch.setattr(wasi_io, "stdin_bytes_setter", lambda: None)

    async def go() -> tuple[ModuleOutput, ModuleRunFailed]:
        store, rt = make_runtime(tmp_path, input_limit_bytes=4096)
        try:
            await load(rt, "thermostat", example("thermostat"), thermo_predicate())
            out = await rt.run("thermostat", readings=[reading("l1/oven", 33.0)])
            await load(rt, "big", example("counter"), {"config": {"blob": "x" * 5000}})
            with pytest.raises(ModuleRunFailed) as info:
                await rt.run("big")
            return out, info.value
        finally:
            store.close()

    out, failed = asyncio.run(go())
    assert [a.payload["fan"] for a in out.actuations] == ["on"]
    assert failed.outcome == "input_invalid" and "config or saved state is too large" in str(failed)


def _writer_wat(total: int, chunk: int, fd: int = 1, exit_code: int = 0) -> str:
    """A command that writes ``total`` bytes ('a'…) to ``fd`` in writes of ``chunk`` bytes (errors ignored)."""
    pages = max(1, -(-(chunk + 16) // 65536))
    return f"""
    (module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
      (memory (export "memory") {pages})
      (func (export "_start")
        (local $left i32) (local $n i32)
        (memory.fill (i32.const 16) (i32.const 97) (i32.const {chunk}))
        (local.set $left (i32.const {total}))
        (block $done (loop $more
          (br_if $done (i32.eqz (local.get $left)))
          (local.set $n (select (local.get $left) (i32.const {chunk})
                                (i32.lt_u (local.get $left) (i32.const {chunk}))))
          (i32.store (i32.const 0) (i32.const 16)) (i32.store (i32.const 4) (local.get $n))
          (drop (call $w (i32.const {fd}) (i32.const 0) (i32.const 1) (i32.const 8)))
          (local.set $left (i32.sub (local.get $left) (local.get $n)))
          (br $more)))
        (if (i32.ne (i32.const {exit_code}) (i32.const 0)) (then (call $exit (i32.const {exit_code}))))))"""


@pytest.mark.parametrize("memfd", [True, False])
def test_stdout_cap_is_exact_for_every_write_pattern_and_sink(memfd: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output exactly at the cap passes, one byte over fails, however the guest splits its writes, with the
    native memory-file sink and with the Python callback sink alike; a flood stays bounded."""
    import wasmtime

    from agent.runtime import runner as R
    from agent.wasm.engine import shared_engine
    from agent.wasm.wasi_io import MemfdSink

    engine = shared_engine()
    runner = R.ModuleRunner(engine)
    if memfd and runner.native is None:
        pytest.skip("no memfd output sink on this platform")
    if not memfd:
        runner.native = None
    cap = 300_000

    def run(total: int, chunk: int, fd: int = 1, exit_code: int = 0, limit: int = cap) -> R.RawRun:
        wasm = bytes(wasmtime.wat2wasm(_writer_wat(total, chunk, fd, exit_code)))
        return runner.execute(engine.compile(wasm), b"",
                              R.Limits(deadline_s=5.0, memory_bytes=16 << 20, stdout_bytes=limit))

    for chunk in (1000, 65536, 300_000, 400_000, 5 << 20):
        ok = run(cap, min(chunk, cap))
        assert ok.outcome == R.OK, (chunk, ok.error)
        assert ok.stdout == b"a" * cap and ok.stdout_bytes == cap
        over = run(cap + 1, chunk)
        assert over.outcome == R.OUTPUT_TOO_LARGE, (chunk, over.outcome, over.error)
        assert over.stdout_bytes > cap and over.stdout == b""
    flood = run(64 << 20, 1 << 20)  # 64 MiB: refused writes, bounded memory, then a clean small run
    assert flood.outcome == R.OUTPUT_TOO_LARGE and cap < flood.stdout_bytes <= cap + 1 + MemfdSink.SLACK
    small = run(5, 5, limit=10)
    assert (small.outcome, small.stdout) == (R.OK, b"aaaaa")  # only this run's bytes, none left from the flood
    failed = run(3000, 700, fd=2, exit_code=4)
    assert failed.outcome == R.EXIT and "stderr: aaa" in failed.error
    assert 0 < len(failed.stderr) <= R.STDERR_KEPT and set(failed.stderr) == {"a"}  # kept, capped
