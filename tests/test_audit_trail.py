"""The bounded audit trail with the real pipeline, the real gate policy and SQLite, on a simulated clock.

Every test checks the accounting identity the way a consumer would (``agent/sync/consumer.py`` over the
sealed window documents): full records + rolled-up counts = decisions made, per key.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from agent.config.pipeline import AuditSettings, PipelineSettings
from agent.control.audit import digest_of, signature
from agent.control.pipeline import Decided, Pipeline
from agent.errors import AgentError
from agent.policy.engine import load_policy
from agent.policy.registry import PolicyRegistry
from agent.storage import Store
from agent.storage.migrations import COMPONENTS, migrate
from agent.sync import codec
from agent.sync.auditwin import seal_job, seal_legacy_job
from agent.sync.consumer import AuditTally, Key
from agent.sync.outbox import enforce_budget
from agent_devkit.gateline import Line, SimClock, device_output
from agent_devkit.opa.gate import build_gate

WINDOW = 60.0


@pytest.fixture(scope="module")
def gate() -> bytes:
    return build_gate()


class Flaky:
    """The gate, failing (as on a deadline) for one subject: errors must be kept in full."""

    def __init__(self, inner: Any, bad: str) -> None:
        self.inner, self.bad = inner, bad
        self.name, self.version = inner.name, inner.version

    def evaluate_json(self, blob: bytes, entrypoint: str | None = None) -> Any:
        if json.loads(blob).get("actuation", {}).get("topic") == self.bad:
            raise AgentError("evaluation exceeded its deadline")
        return self.inner.evaluate_json(blob, entrypoint)


class Truth:
    """What the test itself saw the gate decide: the independent side of every identity check."""

    def __init__(self) -> None:
        self.made: Counter[Key] = Counter()
        self.rolled_inputs: dict[tuple[str, int, Key], list[bytes]] = defaultdict(list)
        self.kept: Counter[str] = Counter()
        self.transitions = 0
        self.errors = 0
        self.last: dict[str, tuple[str, str]] = {}
        self.monos: list[tuple[int, float]] = []  # (policy version, boot clock) of every decision

    def add(self, decided: list[Decided], boot: str, mono: float) -> None:
        for d in decided:
            key = (d.policy_name, d.policy_version, d.subject, d.verdict.outcome, d.verdict.reason)
            self.made[key] += 1
            self.monos.append((d.policy_version, mono))
            self.kept[d.kept or "rolled"] += 1
            state = (d.verdict.outcome, signature(d.verdict.outcome, d.requested, d.verdict.final))
            if self.last.get(d.subject) != state and not d.error:
                self.transitions += 1
            self.last[d.subject] = state
            self.errors += d.error
            if not d.kept:
                self.rolled_inputs[(boot, math.floor(mono / WINDOW), key)].append(d.input_text().encode())


def registry_with(gate: bytes, version: int = 1, data: dict[str, Any] | None = None) -> PolicyRegistry:
    reg = PolicyRegistry()
    reg.swap("gate", load_policy(gate, name="gate", version=version, data=data))
    return reg


async def run_line(pipeline: Pipeline, clk: SimClock, line: Line, seconds: int, truth: Truth,
                   outputs: Any = None) -> None:
    for _ in range(seconds):
        for out in (outputs() if outputs else line.outputs()):
            handled = await pipeline.handle(out)
            truth.add(handled.decisions, clk.boot, clk().mono)
        clk.t += 1.0


def docs(store: Store) -> list[tuple[str, dict[str, Any]]]:
    conn = store.reader()
    try:
        return [(str(k), json.loads(codec.unpack(p, int(e)))) for k, p, e in conn.execute(
            "SELECT key, payload, enc FROM outbox WHERE cls = 1 ORDER BY id")]
    finally:
        conn.close()


def tally(store: Store) -> AuditTally:
    t = AuditTally()
    for key, payload in docs(store):
        t.add(key, payload)
    assert t.problems == []
    return t


def seal_all(store: Store, clk: SimClock) -> None:
    clk.t += 2 * WINDOW
    while store.writer.run_sync(seal_job(clk(), 10**9)):
        pass


def test_every_decision_is_counted_and_what_an_auditor_needs_is_kept(store: Store, gate: bytes) -> None:
    clk = SimClock()
    line = Line(12, seed=3, hot_every=40)
    reg = registry_with(gate)
    reg.swap("gate", Flaky(reg.get("gate"), f"actuators/{line.devices[5]}/fan"))  # type: ignore[arg-type]
    pipeline = Pipeline(store, PipelineSettings(), "gw", publisher=None, policies=reg,
                        audit=AuditSettings(window_s=WINDOW), now=clk)
    truth = Truth()

    async def scenario() -> None:
        await run_line(pipeline, clk, line, 200, truth)
        # a new policy version (press3 locked out too): every decision of its first window is kept
        reg.swap("gate", load_policy(gate, name="gate", version=2,
                                     data={"edge": {"lockout": ["line1/press2", "line1/press3"],
                                                    "actuated": ["fan"], "limits": {"temp": [-40, 150]}}}))
        await run_line(pipeline, clk, line, 200, truth)

    asyncio.run(scenario())
    seal_all(store, clk)
    got = tally(store)
    assert sum(truth.made.values()) > 0.99 * 400 * 12 * 3  # (a property equal to the last is not re-decided)
    assert got.made == truth.made  # per policy version, subject, outcome and reason: nothing unaccounted
    assert got.kept["error"] == truth.errors == 200  # every failed evaluation in full
    assert got.kept["transition"] == truth.transitions > 12 * 3  # every transition in full
    # and the routine repeats rolled up (here most decisions: 12 devices, 60 s windows, a new version)
    assert truth.kept["rolled"] > 0.6 * sum(truth.made.values())
    v2 = [r for _, d in docs(store) if d["type"] == "audit_window" for r in d["records"] if r["version"] == 2]
    v2_start = min(m for v, m in truth.monos if v == 2)
    made_first = sum(1 for v, m in truth.monos if v == 2 and m - v2_start < WINDOW)
    assert len([r for r in v2 if r["mono"] - v2_start < WINDOW]) == made_first > WINDOW * 12 * 3 * 0.99
    for key, doc in docs(store):
        for c in doc["counts"]:
            assert c["full"] >= 1  # at least one exemplar per key and window
            inputs = truth.rolled_inputs.get((doc["boot"], doc["index"][0], (c["policy"], c["version"],
                                              c["subject"], c["outcome"], c["reason"])), [])
            assert c["digest"] == digest_of(inputs), key  # a replayed input stream checks against it
        for r in doc["records"]:
            json.loads(r["input"])  # the exact input text the policy evaluated
    # the running totals (status) agree with the consumer
    conn = store.reader()
    made, full, rolled = conn.execute("SELECT sum(made), sum(full), sum(rolled) FROM audit_keys").fetchone()
    conn.close()
    assert made == sum(truth.made.values()) and full == sum(got.full.values()) and rolled == made - full


def test_restart_keeps_transition_state_and_window_exemplars(store: Store, gate: bytes) -> None:
    clk = SimClock()
    line = Line(4, seed=1, hot_every=0)
    truth = Truth()

    def pipeline() -> Pipeline:
        return Pipeline(store, PipelineSettings(), "gw", publisher=None, policies=registry_with(gate),
                        audit=AuditSettings(window_s=WINDOW), now=clk)

    asyncio.run(run_line(pipeline(), clk, line, 90, truth))  # past the policy's first window, into window 3
    before = dict(truth.kept)
    # a restart inside the same window: no subject looks new, no key gets a second exemplar
    asyncio.run(run_line(pipeline(), clk, line, 20, truth))
    assert truth.kept["transition"] == before["transition"] and truth.kept["exemplar"] == before["exemplar"]
    assert truth.kept["rolled"] == before["rolled"] + 20 * 4 * 3
    seal_all(store, clk)
    assert tally(store).made == truth.made


def test_a_late_decision_reopens_its_sealed_window_as_a_new_part(store: Store, gate: bytes) -> None:
    clk = SimClock()
    truth = Truth()
    pipeline = Pipeline(store, PipelineSettings(), "gw", publisher=None, policies=registry_with(gate),
                        audit=AuditSettings(window_s=WINDOW), now=clk)
    asyncio.run(run_line(pipeline, clk, Line(3), 5, truth))
    late = clk()
    clk.t += 2 * WINDOW
    store.writer.run_sync(seal_job(clk(), 10**9))
    # a job stamped inside the window commits after it was sealed (queued behind the seal)
    pipeline.now = lambda: late
    handled = asyncio.run(pipeline.handle(device_output("line1/press1", True, 30.0)))
    truth.add(handled.decisions, late.boot_id, late.mono)
    pipeline.now = clk
    store.writer.run_sync(seal_job(clk(), 10**9))
    keys = [k for k, _ in docs(store)]
    assert keys == ["audit/boot-1/60/1/0", "audit/boot-1/60/1/1"]
    assert tally(store).made == truth.made


def test_disk_pressure_widens_windows_and_keeps_counts_and_transitions(store: Store, gate: bytes) -> None:
    clk = SimClock()
    truth = Truth()
    pipeline = Pipeline(store, PipelineSettings(), "gw", publisher=None, policies=registry_with(gate),
                        audit=AuditSettings(window_s=10.0), now=clk)
    line = Line(10, seed=5, hot_every=30)

    async def scenario() -> None:
        for _ in range(30):
            await run_line(pipeline, clk, line, 10, truth)
            store.writer.run_sync(seal_job(clk(), 10**9))

    asyncio.run(scenario())
    seal_all(store, clk)
    before = tally(store)
    assert before.made == truth.made and before.windows >= 29
    conn = store.reader()
    held = conn.execute("SELECT sum(bytes) FROM outbox_classes").fetchone()[0]
    conn.close()
    store.writer.run_sync(lambda db: enforce_budget(db.conn, int(held * 1.5 * 0.5)))
    after = tally(store)
    assert after.made == truth.made  # counts never shed: the identity still holds, per key
    assert after.kept["transition"] == before.kept["transition"]  # transitions never shed
    assert after.kept["exemplar"] < before.kept["exemplar"] and after.windows < before.windows
    shed = [g for g in after.gaps if g["what"] == "audit_exemplars"]
    assert shed and sum(g["records"] for g in shed) == sum(before.full.values()) - sum(after.full.values())
    conn = store.reader()
    full, rolled, moved = conn.execute("SELECT sum(full), sum(rolled), sum(shed) FROM audit_keys").fetchone()
    conn.close()
    assert full == sum(after.full.values()) and moved == sum(g["records"] for g in shed)
    assert full + rolled == sum(truth.made.values())


def test_clock_steps_and_a_reboot_leave_windows_correct(store: Store, gate: bytes) -> None:
    clk = SimClock(mono0=60.0)  # boot 1 runs within its window 1 (boot clock 60..120)
    truth = Truth()
    line = Line(3, hot_every=0)
    pipeline = Pipeline(store, PipelineSettings(), "gw", publisher=None, policies=registry_with(gate),
                        audit=AuditSettings(window_s=WINDOW), now=clk)

    made = [0]

    async def scenario() -> None:
        await run_line(pipeline, clk, line, 20, truth)
        clk.wall_offset = 86_400.0  # NTP steps the wall clock a day ahead inside the window
        await run_line(pipeline, clk, line, 20, truth)
        clk.wall_offset = -86_400.0  # and a day back
        await run_line(pipeline, clk, line, 10, truth)
        made[0] = sum(truth.made.values())
        clk.reboot("boot-2", down_s=300, wall_offset=-(clk().wall - 50.0))  # reboot into 1970 (no RTC)
        await run_line(pipeline, clk, line, 20, truth)

    asyncio.run(scenario())
    # boot 1's window is over although boot 2's clock reads lower: sealed at once; boot 2's is still open
    store.writer.run_sync(seal_job(clk(), 10**9))
    first = docs(store)
    assert [d["boot"] for _, d in first] == ["boot-1"]
    doc = first[0][1]
    assert doc["index"] == [1, 1] and sum(c["full"] + c["rolled"] for c in doc["counts"]) == made[0]
    seal_all(store, clk)
    assert tally(store).made == truth.made


def test_an_existing_database_upgrades_in_place(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    conn = sqlite3.connect(state / "agent.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrate(conn, COMPONENTS, targets={"core": 3, "telemetry": 1, "outbox": 1})
    for i in range(3):
        conn.execute("INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, input, "
                     "result, outcome, reason, subject) VALUES (?, 'b0', ?, 'gate', 1, 'edge/decision', ?, '[]', "
                     "'allow', 'ok', 's')", (1_780_000_000.0 + i, float(i), f'{{"i":{i}}}'))
    conn.execute("INSERT INTO outbox_boots (boot_id, first_wall, last_wall, last_mono) VALUES ('b0', 1, 1, 1)")
    conn.execute("INSERT INTO outbox (cls, key, payload, wall, boot, mono, bytes) VALUES (1, 'decision/1', "
                 "'{\"type\":\"decision\",\"id\":1}', 1780000000.0, 1, 0.0, 100)")
    conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('outbox.decisions_cursor', '1', 0)")
    conn.close()
    store = Store.open(state)
    try:
        assert store.writer.run_sync(seal_legacy_job(10**9)) == 2  # rows 2 and 3: row 1 was already copied
        got = {k: d for k, d in docs(store)}
        assert got["decision/1"] == {"type": "decision", "id": 1}  # an old plain row is still there, readable
        assert [r["id"] for r in got["decision-legacy/2-3"]["records"]] == [2, 3]
    finally:
        store.close()
