"""The real daemon (``edge-agent run``) killed with SIGKILL mid-stream loses nothing the broker got.

A publisher counts the broker's PUBACKs; the agent is SIGKILLed while it ingests and restarted on
the same state dir. Its persistent session (stable client id, clean_session=False) makes the broker
keep and redeliver everything the agent had not acknowledged — and it acknowledges only after the
SQLite commit — so every PUBACKed reading must end up in SQLite exactly as published.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent_devkit.broker import Broker
from agent_devkit.localbus import persistent_broker, publish_counted
from agent_devkit.procs import AgentProcess, agent_process

TOTAL = 6000


def write_config(path: Path, broker: Broker) -> Path:
    path.write_text(f"""
[agent]
node_id = "fault-test"
heartbeat_interval_s = 1.0
[local_broker]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 1.0
""")
    return path


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def wait_until(cond: object, within: float, what: str, agent: AgentProcess | None = None) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}" + (f"\n{agent.output()[-3000:]}" if agent else ""))


def test_agent_sigkilled_mid_stream_loses_nothing_the_broker_acknowledged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    db = state / "agent.db"
    items = [(f"factory/line{i % 3}/s{i % 5}/temp", json.dumps({"value": i, "seq": i}).encode())
             for i in range(TOTAL)]
    backlog = TOTAL * 2 // 3
    with persistent_broker(tmp_path / "mq") as broker:
        config = write_config(tmp_path / "agent.toml", broker)
        # 1. the agent's first start creates its persistent session; then it is killed
        with agent_process(state, config) as setup:
            setup.wait_ready()
            wait_until(lambda: query(db, "SELECT state FROM links WHERE name='local_broker'") == [("up",)], 30,
                       "the local bus to connect", setup)
            setup.kill()
        # 2. while it is down the line keeps publishing: the broker queues for the session
        acked = asyncio.run(publish_counted(broker.host, broker.port, items[:backlog], client_id="fault-pub"))
        # 3. it restarts into a flood of redelivered readings and is SIGKILLed mid-stream, while the
        #    line keeps publishing the rest
        second = AgentProcess(state, config)
        try:
            async def publish_and_kill() -> tuple[list[int], int]:
                async def killer() -> int:
                    while True:
                        rows = query(db, "SELECT count(*) FROM readings")
                        if rows and int(rows[0][0]) >= backlog // 4:
                            second.proc.send_signal(9)
                            return int(rows[0][0])
                        await asyncio.sleep(0.01)

                kill = asyncio.create_task(killer())
                more = await publish_counted(broker.host, broker.port, items[backlog:], client_id="fault-pub",
                                             in_flight=20)
                return [backlog + i for i in more], await asyncio.wait_for(kill, 60)

            more, stored_at_kill = asyncio.run(publish_and_kill())
            second.proc.wait(30)
        finally:
            second.close()
        acked += more
        assert len(acked) == TOTAL
        assert stored_at_kill < TOTAL, "the agent was killed only after everything was stored"
        # 4. after the restart, every reading the broker acknowledged to the line is in SQLite
        with agent_process(state, config) as third:
            third.wait_ready()

            def all_there() -> bool:
                seqs = {int(r[0]) for r in query(db, "SELECT json_extract(payload, '$.seq') FROM readings")
                        if r[0] is not None}
                return seqs >= set(acked)
            wait_until(all_there, 90, "every acknowledged reading in SQLite after the restart", third)
    rows = query(db, "SELECT json_extract(payload, '$.seq'), value FROM readings")
    seqs = [int(r[0]) for r in rows]
    assert set(seqs) == set(range(TOTAL))
    assert all(float(v) == s for s, (_, v) in zip(seqs, rows, strict=True))
    # at-least-once: redelivery after the kill may duplicate what was stored but not yet acked
    assert len(seqs) - len(set(seqs)) <= 1000
