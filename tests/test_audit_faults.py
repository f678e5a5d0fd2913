"""The accounting identity under faults, checked on the consumer side of a real Mosquitto.

- SIGKILL while windows are sealed and widened under a budget far too small (every kill is also a
  reboot: a new boot id, the previous boot's windows sealed after the restart);
- the real daemon with a budget far too small: detail shed into gap records while actuation goes on.

Ground truth is independent of the audit code: the child counts each decision in a table of its own,
in the same transaction as the decision.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.config.sync import OutboxSettings
from agent.storage import Store
from agent.sync.consumer import AuditTally, Key
from agent.sync.drain import Drainer
from agent_devkit import REPO
from agent_devkit.broker import Broker
from agent_devkit.demo import sign_and_install
from agent_devkit.localbus import persistent_broker
from agent_devkit.opa.gate import build_gate
from agent_devkit.procs import agent_process, status_json
from agent_devkit.uplink import Consumer

CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from agent.logs import configure
    configure("error", "json")
    from agent.control.pipeline import Pipeline
    from agent.config.pipeline import AuditSettings, PipelineSettings
    from agent.policy.engine import load_policy
    from agent.policy.registry import PolicyRegistry
    from agent.storage import Store
    from agent.sync.outbox import Outbox
    from agent.sync.service import OutboxService
    from agent.config.sync import OutboxSettings
    from agent_devkit.gateline import Line, SimClock

    state, bundle, boot, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    store = Store.open(state)
    store.writer.run_sync(lambda db: db.conn.execute(
        "CREATE TABLE IF NOT EXISTS truth (policy, version, subject, outcome, reason, n, "
        "PRIMARY KEY (policy, version, subject, outcome, reason))"))

    class Counted(Pipeline):
        def _persist_job(self, decided, output, stamp, source, plan):
            inner = super()._persist_job(decided, output, stamp, source, plan)
            def job(db):
                out = inner(db)
                for d in decided:
                    db.conn.execute("INSERT INTO truth VALUES (?, ?, ?, ?, ?, 1) ON CONFLICT DO UPDATE SET n = n + 1",
                                    (d.policy_name, d.policy_version, d.subject, d.verdict.outcome, d.verdict.reason))
                return out
            return job

    reg = PolicyRegistry()
    reg.swap("gate", load_policy(bundle.read_bytes(), name="gate", version=1))
    clk = SimClock(t=start, boot=boot, mono0=10.0 - start)
    settings = OutboxSettings(disk_budget_bytes=40_000)
    pipeline = Counted(store, PipelineSettings(), "gw", publisher=None, policies=reg,
                       audit=AuditSettings(window_s=10.0), now=clk)
    service = OutboxService(store, settings, Outbox(store.writer, settings), now=clk)
    line = Line(6, seed=int(start), hot_every=20)

    async def main():
        n = 0
        while True:
            for out in line.outputs():
                await pipeline.handle(out)
            clk.t += 1.0
            await service.tick(expire=True)
            n += 1
            if n == 40:
                print("compacting", flush=True)
    asyncio.run(main())
""")


def truth(path: Path) -> Counter[Key]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return Counter({(p, int(v), s, o, r): int(n) for p, v, s, o, r, n in conn.execute("SELECT * FROM truth")})
    finally:
        conn.close()


@pytest.mark.slow
def test_identity_holds_across_sigkill_during_compaction_budget_pressure_and_drain(broker: Broker,
                                                                                   tmp_path: Path) -> None:
    state = tmp_path / "state"
    bundle = tmp_path / "gate.tar.gz"
    bundle.write_bytes(build_gate())
    rng = random.Random(11)
    start = 0.0
    for run in range(4):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state), str(bundle), f"boot-{run}", str(start)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 60
            line = ""
            while line != "compacting" and time.monotonic() < deadline:
                ready, _, _ = select.select([proc.stdout], [], [], 5)
                line = proc.stdout.readline().strip() if ready else line
                assert proc.poll() is None, "the child died before it compacted"
            assert line == "compacting"
            time.sleep(rng.uniform(0.1, 0.8))
        finally:
            os.kill(proc.pid, signal.SIGKILL)  # mid-compaction, no clean stop
            proc.wait(10)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()
        start += 10_000.0  # the next run is a new boot, much later
    expected = truth(state / "agent.db")
    assert sum(expected.values()) > 4 * 40 * 6 * 3 * 0.9

    async def drain() -> Consumer:
        from agent.clock import Stamp
        from agent.sync.auditwin import seal_job
        store = Store.open(state)
        try:
            # after the last reboot: every window of the earlier boots is over and gets sealed
            while store.writer.run_sync(seal_job(Stamp(2e9, "boot-final", 1e6), 40_000)):
                pass
            consumer = await Consumer(broker.host, broker.port).start()
            drainer = Drainer(store, OutboxSettings(uplink_url=broker.url, jitter_max_s=0, rate_limit_records_s=0),
                              "gw")
            task = asyncio.create_task(drainer.run())
            try:
                async with asyncio.timeout(60):
                    while True:
                        await asyncio.sleep(0.1)
                        conn = store.reader()
                        left = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
                        conn.close()
                        if left == 0:
                            break
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await consumer.stop()
            return consumer
        finally:
            store.close()

    consumer = asyncio.run(drain())
    tally = AuditTally()
    for key, payload in consumer.payloads.items():
        tally.add(key, payload)
    assert tally.problems == []
    assert tally.made == expected  # per policy version, subject, outcome, reason: 0 unaccounted
    shed = [g for g in tally.gaps if g["what"].startswith("audit")]
    assert shed, "the budget was far too small: detail must have been shed into gap records"
    assert tally.kept["transition"] > 0


@pytest.mark.slow
def test_a_far_too_small_budget_sheds_detail_while_the_daemon_keeps_actuating(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with persistent_broker(tmp_path / "mq") as broker:
        config = tmp_path / "agent.toml"
        config.write_text(f"""
[agent]
node_id = "tiny-budget"
heartbeat_interval_s = 1.0
[local_broker]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
[policy]
decision_policy = "gate"
[outbox]
disk_budget_bytes = 20000
maintenance_interval_s = 1.0
pack_wait_s = 1.0
[audit]
window_s = 10.0
""")
        sign_and_install(tmp_path, state, config)
        with agent_process(state, config) as agent:
            agent.wait_ready()
            fans: list[float] = []

            async def line() -> dict[str, Any]:
                async with aiomqtt.Client(broker.host, broker.port, identifier="t-fans") as sub:
                    await sub.subscribe("actuators/#", qos=1)

                    async def listen() -> None:
                        async for _ in sub.messages:
                            fans.append(time.monotonic())
                    listener = asyncio.create_task(listen())
                    async with aiomqtt.Client(broker.host, broker.port, identifier="t-line") as pub:
                        started = time.monotonic()
                        i = 0
                        report: dict[str, Any] = {}
                        while time.monotonic() - started < 60:
                            for dev in range(1, 11):
                                temp = 35.0 if i % 2 == 0 else 20.0  # every reading flips the fan
                                await pub.publish(f"factory/line1/press{dev}/temp", str(temp), qos=1)
                            i += 1
                            await asyncio.sleep(0.1)
                            if i % 20 == 0:
                                _, report = await asyncio.to_thread(status_json, state, config)
                                if report.get("audit", {}).get("gaps") and time.monotonic() - started > 25:
                                    break
                        await asyncio.sleep(1.0)
                    listener.cancel()
                    return report
            report = asyncio.run(line())
            assert agent.stop() == 0
        audit = report["audit"]
        assert audit["gaps"], json.dumps(report.get("outbox"))  # detail was shed, and said so
        assert audit["identity_holds"] and audit["decisions"] > 500
        assert any("gap record" in w for w in report["warnings"])
        # control never paused: fan commands kept coming through the whole run, to its last seconds
        assert len(fans) > 200 and fans[-1] - fans[0] > 20
        gaps = sum(1 for t0, t1 in itertools.pairwise(fans) if t1 - t0 > 2.0)
        assert gaps == 0, "actuation paused"
