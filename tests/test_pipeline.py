"""The control loop end to end with real parts: Mosquitto, SQLite, the C thermostat module built by
scripts/build-examples.sh, and the gate policy (examples/policies/gate.c, OPA Wasm ABI) — plus the
gate contract (allow / deny / modify) as pure functions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.model import LocalBrokerSettings
from agent.config.modules import ModuleSettings
from agent.config.pipeline import PipelineSettings
from agent.control.contract import verdict
from agent.control.pipeline import Pipeline
from agent.messaging.bus import LocalBus
from agent.messaging.ingest import Ingest
from agent.policy.engine import encode_input, load_policy
from agent.policy.registry import PolicyRegistry
from agent.runtime.contract import Actuation, ModuleOutput, Property
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store
from agent_devkit.broker import Broker
from agent_devkit.demo import THERMOSTAT_PREDICATE
from agent_devkit.examples import example
from agent_devkit.localbus import persistent_broker
from agent_devkit.opa.build import build
from agent_devkit.opa.gate import build_gate


def gate_bundle() -> bytes:
    """The demo gate policy bundle, built from C (examples/policies/gate.c)."""
    return build_gate()


@pytest.fixture(scope="module")
def gate() -> bytes:
    return gate_bundle()




class Loop:
    """The daemon's wiring of bus → ingest → modules → pipeline → bus, in process."""

    def __init__(self, broker: Broker, store: Store, state_dir: Path, registry: PolicyRegistry | None,
                 settings: PipelineSettings | None = None) -> None:
        bs = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="t-loop", reconnect_min_s=0.05)
        self.store = store
        self.bus = LocalBus(bs, "node")
        self.ingest = Ingest(store, on_store_failure=self.bus.request_reconnect)
        self.bus.subscribe("factory/#", self.ingest.handle, manual_ack=True)
        self.runtime = ModuleRuntime(store, ModuleSettings(), state_dir=state_dir)
        self.pipeline = Pipeline(store, settings or PipelineSettings(), "node", publisher=self.bus,
                                 policies=registry)
        self.ingest.add_listener(self.runtime.offer)
        self.runtime.set_sink(self.pipeline.sink)
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Loop:
        wasm = example("thermostat")
        await self.runtime.load_release("thermostat", 1, hashlib.sha256(wasm).hexdigest(), wasm,
                                        THERMOSTAT_PREDICATE)
        self.tasks = [asyncio.create_task(self.bus.run()), asyncio.create_task(self.ingest.run()),
                      asyncio.create_task(self.pipeline.run())]
        assert await self.bus.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pipeline.idle()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.runtime.close()


async def collect(broker: Broker, readings: list[tuple[str, bytes]], loop: Loop, expect_decisions: int,
                  within: float = 20.0) -> list[tuple[str, Any]]:
    got: list[tuple[str, Any]] = []
    async with aiomqtt.Client(broker.host, broker.port, identifier="t-actuator") as sub:
        await sub.subscribe("actuators/#", qos=1)
        async with aiomqtt.Client(broker.host, broker.port, identifier="t-sensor") as pub:
            for topic, payload in readings:
                await pub.publish(topic, payload, qos=1)
        deadline = time.monotonic() + within
        while time.monotonic() < deadline and sum(loop.pipeline.counts[k] for k in ("allow", "modify", "deny")) \
                < expect_decisions:
            await asyncio.sleep(0.05)
        try:
            async with asyncio.timeout(1.0):
                async for m in sub.messages:
                    got.append((str(m.topic), json.loads(bytes(m.payload))))  # type: ignore[arg-type,unused-ignore]
        except TimeoutError:
            pass
    return got


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    conn = store.reader()
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_reading_to_module_to_policy_to_actuation_end_to_end(tmp_path: Path, store: Store, gate: bytes) -> None:
    registry = PolicyRegistry()
    registry.swap("gate", load_policy(gate, name="gate", version=1))

    async def scenario(broker: Broker) -> list[tuple[str, Any]]:
        async with Loop(broker, store, tmp_path / "state", registry) as loop:
            # press1: too hot → fan on (allowed, sensor value masked); press2: locked out → denied;
            # press3: 200 °C → fan on, and its temp property clamped to the policy's 150
            return await collect(broker, [("factory/line1/press1/temp", b"35.5"),
                                          ("factory/line1/press2/temp", b'{"value": 36}'),
                                          ("factory/line1/press3/temp", b"200")], loop, expect_decisions=9)

    with persistent_broker(tmp_path / "mq") as broker:
        published = asyncio.run(scenario(broker))
    assert sorted(published) == [
        ("actuators/line1/press1/fan", {"device": "line1/press1", "fan": "on"}),
        ("actuators/line1/press3/fan", {"device": "line1/press3", "fan": "on"}),
    ]
    decisions = rows(store, "SELECT subject, outcome, reason, policy_name, policy_version, input, result"
                            " FROM decisions ORDER BY id")
    by_subject = {d[0]: d for d in decisions}
    denied = by_subject["actuators/line1/press2/fan"]
    assert denied[1:5] == ("deny", "device is locked out for maintenance", "gate", 1)
    assert json.loads(denied[5])["actuation"]["payload"] == {"fan": "on", "device": "line1/press2", "value": 36}
    assert json.loads(denied[6]) == [{"result": {"allow": False, "reason": "device is locked out for maintenance"}}]
    assert by_subject["actuators/line1/press1/fan"][1:3] == ("modify", "fan command")
    assert by_subject["line1/press3/temp"][1] == "modify"
    assert by_subject["line1/press1/temp"][1] == "allow"
    props = {(d, n): (v, t) for d, n, v, t in rows(store, "SELECT device, name, value, type FROM properties")}
    assert props[("line1/press3", "temp")] == ("150", "float")
    assert props[("line1/press1", "temp")] == ("35.5", "float")
    # press2's fan command was denied, so its fan property (the module's belief) is denied too: nothing
    # (status, KubeEdge twins) claims the fan is on; its temperature, an observation, is stored
    assert ("line1/press2", "fan") not in props
    assert props[("line1/press2", "temp")] == ("36", "float")
    assert by_subject["line1/press2/fan"][1:3] == ("deny", "device is locked out for maintenance: actuated state "
                                                           "not changed")
    assert by_subject["line1/press2/temp"][1:3] == ("allow", "property update")
    assert by_subject["line1/press1/fan"][1:3] == ("allow", "property update")
    acts = rows(store, "SELECT topic, payload, state FROM actuations ORDER BY topic")
    assert [(t, json.loads(p), s) for t, p, s in acts] == [
        ("actuators/line1/press1/fan", {"fan": "on", "device": "line1/press1"}, "published"),
        ("actuators/line1/press3/fan", {"fan": "on", "device": "line1/press3"}, "published")]
    events = rows(store, "SELECT source, device, severity, name FROM events ORDER BY device")
    assert ("thermostat", "line1/press2", "warning", "overheat") in events


def test_an_unchanged_property_is_not_decided_again_but_a_new_policy_version_decides(
        tmp_path: Path, store: Store, gate: bytes) -> None:
    registry = PolicyRegistry()
    registry.swap("gate", load_policy(gate, name="gate", version=1))

    async def scenario(broker: Broker) -> None:
        async with Loop(broker, store, tmp_path / "state", registry) as loop:
            await collect(broker, [("factory/l/p/temp", b"35")], loop, expect_decisions=3)
            # same reading again: the fan stays on, the properties do not change → no decisions
            await collect(broker, [("factory/l/p/temp", b"35")], loop, expect_decisions=4, within=2)
            assert loop.pipeline.counts["unchanged_properties"] == 2
            registry.swap("gate", load_policy(gate, name="gate", version=2))
            await collect(broker, [("factory/l/p/temp", b"35")], loop, expect_decisions=5)

    with persistent_broker(tmp_path / "mq") as broker:
        asyncio.run(scenario(broker))
    got = rows(store, "SELECT subject, policy_version FROM decisions ORDER BY id")
    assert got == [("actuators/l/p/fan", 1), ("l/p/fan", 1), ("l/p/temp", 1), ("l/p/fan", 2), ("l/p/temp", 2)]


def test_without_a_gate_policy_every_actuation_is_denied_and_logged(tmp_path: Path, store: Store) -> None:
    async def scenario(broker: Broker) -> list[tuple[str, Any]]:
        async with Loop(broker, store, tmp_path / "state", PolicyRegistry()) as loop:
            return await collect(broker, [("factory/l/p/temp", b"40")], loop, expect_decisions=3)

    with persistent_broker(tmp_path / "mq") as broker:
        assert asyncio.run(scenario(broker)) == []
    outcomes = rows(store, "SELECT subject, outcome, policy_name, reason FROM decisions ORDER BY id")
    assert {o[1] for o in outcomes} == {"deny"}
    assert all(o[2] == "(none)" and "no gate policy installed" in o[3] for o in outcomes)
    assert rows(store, "SELECT count(*) FROM properties") == [(0,)]


def test_a_failing_policy_denies_with_the_reason(tmp_path: Path, store: Store, gate: bytes) -> None:
    registry = PolicyRegistry()
    registry.swap("gate", load_policy(gate, name="gate", version=3))
    settings = PipelineSettings(policy_entrypoint="edge/missing")

    async def scenario(broker: Broker) -> list[tuple[str, Any]]:
        async with Loop(broker, store, tmp_path / "state", registry, settings) as loop:
            return await collect(broker, [("factory/l/p/temp", b"40")], loop, expect_decisions=3)

    with persistent_broker(tmp_path / "mq") as broker:
        assert asyncio.run(scenario(broker)) == []
    reasons = [r for (r,) in rows(store, "SELECT reason FROM decisions WHERE subject = 'actuators/l/p/fan'")]
    assert len(reasons) == 1 and "unknown_entrypoint" in reasons[0] and "edge/missing" in reasons[0]


@pytest.mark.parametrize(("result_set", "requested", "kind", "expected"), [
    ([{"result": True}], {"a": 1}, "actuation", ("allow", {"a": 1})),
    ([{"result": False}], {"a": 1}, "actuation", ("deny", None)),
    ([], {"a": 1}, "actuation", ("deny", None)),
    ([{"result": "yes"}], {"a": 1}, "actuation", ("deny", None)),
    ([{"result": {"allow": True, "mask": ["secret", "x.y"]}}], {"a": 1, "secret": 2, "x": {"y": 3, "z": 4}},
     "actuation", ("modify", {"a": 1, "x": {"z": 4}})),
    ([{"result": {"allow": True, "clamp": {"speed": [0, 100]}}}], {"speed": 140}, "actuation",
     ("modify", {"speed": 100})),
    ([{"result": {"allow": True, "clamp": {"": [-40, 150]}}}], 21.5, "property", ("allow", 21.5)),
    ([{"result": {"allow": True, "value": "masked"}}], "secret", "property", ("modify", "masked")),
    ([{"result": {"allow": True, "payload": {"cmd": "stop"}}}], {"cmd": "go"}, "actuation",
     ("modify", {"cmd": "stop"})),
    ([{"result": {"allow": True, "clamp": {"speed": "fast"}}}], {"speed": 1}, "actuation", ("deny", None)),
    ([{"result": {"allow": False, "reason": "night shift"}}], 1, "actuation", ("deny", None)),
])
def test_gate_verdicts(result_set: Any, requested: Any, kind: str, expected: tuple[str, Any]) -> None:
    v = verdict(result_set, requested, kind)
    assert (v.outcome, v.final) == expected
    assert v.reason


def test_gate_verdict_reasons_say_why() -> None:
    assert "undefined" in verdict([], 1, "actuation").reason
    assert verdict([{"result": {"allow": False, "reason": "night shift"}}], 1, "actuation").reason == "night shift"
    assert "unexpected shape" in verdict([{"result": 3}], 1, "actuation").reason
    assert "clamp bounds" in verdict([{"result": {"allow": True, "clamp": {"a": [1]}}}], {"a": 1}, "actuation").reason


@pytest.mark.parametrize("result", [
    {"allow": True, "mask": ""}, {"allow": True, "mask": 0}, {"allow": True, "mask": None},
    {"allow": True, "clamp": []}, {"allow": True, "clamp": ""}, {"allow": True, "mask": "value"},
])
def test_a_malformed_modification_denies_even_when_empty(result: dict[str, Any]) -> None:
    v = verdict([{"result": result}], {"value": 1}, "actuation")
    assert (v.outcome, v.final) == ("deny", None)
    assert "policy modification invalid" in v.reason


def test_a_modification_changes_neither_the_request_nor_the_policy_result() -> None:
    requested = {"fan": "on", "value": 36, "nested": {"secret": 1, "keep": [1, 2]}}
    result_set = [{"result": {"allow": True, "mask": ["value", "nested.secret"], "clamp": {"nested.keep": [0, 1]},
                              "payload": {"fan": "on", "value": 36, "nested": {"secret": 1, "keep": 5}}}}]
    before = json.dumps([requested, result_set])
    v = verdict(result_set, requested, "actuation")
    assert (v.outcome, v.final) == ("modify", {"fan": "on", "nested": {"keep": 1}})
    assert json.dumps([requested, result_set]) == before  # the audit record keeps what was asked and answered


def _output(actuations: list[Actuation], properties: list[Property]) -> ModuleOutput:
    return ModuleOutput(name="thermostat", version=4, trigger={"kind": "manual"}, actuations=actuations,
                        properties=properties)


def test_the_logged_decision_input_is_exactly_what_the_policy_evaluated(store: Store) -> None:
    """The echo entrypoint answers with the input it parsed: the log's input and result must agree."""
    registry = PolicyRegistry()
    registry.swap("echo", load_policy(build("sandbox"), name="echo", version=2))
    pipeline = Pipeline(store, PipelineSettings(policy_entrypoint="ok/echo"), "node-7", publisher=None,
                        policies=registry)
    payload = {"fan": "on", "note": "caf\u00e9 \u2028 \"q\"", "value": 36.25, "n": [1, None, True]}
    handled = asyncio.run(pipeline.handle(_output([Actuation("actuators/l/p/fan", payload)],
                                                  [Property("l/p", "temp", 36.25, "float")])))
    assert [d.verdict.outcome for d in handled.decisions] == ["deny", "deny"]  # an echo is no verdict: fail closed
    logged = rows(store, "SELECT subject, input, result, outcome FROM decisions ORDER BY id")
    assert [r[0] for r in logged] == ["actuators/l/p/fan", "l/p/temp"]
    for (_subject, input_text, result_text, outcome), d in zip(logged, handled.decisions, strict=True):
        seen = json.loads(result_text)[0]["result"]
        assert json.loads(input_text) == seen == d.input
        assert input_text == encode_input(d.input).decode()  # one encoding: the bytes the policy was given
        assert outcome == "deny"
    assert json.loads(logged[0][1])["actuation"]["payload"] == payload
    assert json.loads(logged[1][1])["property"] == {"device": "l/p", "name": "temp", "value": 36.25, "type": "float"}


def test_gate_decisions_log_input_and_raw_result_and_publish_the_modified_payload(store: Store, gate: bytes) -> None:
    registry = PolicyRegistry()
    registry.swap("gate", load_policy(gate, name="gate", version=1))
    pipeline = Pipeline(store, PipelineSettings(), "node", publisher=None, policies=registry)
    payload = {"fan": "on", "device": "line1/press1", "value": 35.5}
    handled = asyncio.run(pipeline.handle(_output([Actuation("actuators/line1/press1/fan", payload)], [])))
    (d,) = handled.decisions
    assert (d.verdict.outcome, d.verdict.final) == ("modify", {"fan": "on", "device": "line1/press1"})
    assert payload == {"fan": "on", "device": "line1/press1", "value": 35.5}  # the module's request is untouched
    ((input_text, result_text),) = rows(store, "SELECT input, result FROM decisions")
    assert json.loads(input_text)["actuation"]["payload"] == payload
    assert json.loads(result_text) == [{"result": {"allow": True, "reason": "fan command", "mask": ["value"]}}]
