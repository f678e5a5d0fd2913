"""Telemetry tiers: raw readings become 1-minute and 1-hour rollups before retention trims them; buckets on
the boot clock survive clock steps; the cloud gets rollups for the outage and raw readings only for the
recent past, while the uplink is up. Also: ``edge-agent plan``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.clock import Stamp
from agent.config.pipeline import PipelineSettings
from agent.config.sync import OutboxSettings
from agent.config.telemetry import TelemetrySettings
from agent.messaging.ingest import store_batch_job
from agent.messaging.readings import Reading
from agent.messaging.retention import run_retention
from agent.storage import Store
from agent.sync import codec
from agent.sync.outbox import Outbox
from agent.sync.service import OutboxService
from agent_devkit import REPO

WALL0 = 1_780_000_000.0


def readings(store: Store, start: float, seconds: int, boot: str = "boot-a", wall_offset: float = 0.0,
             mono0: float = 0.0) -> None:
    rows = [Reading(f"factory/l1/d{d}/temp", f"l1/d{d}", "temp", float(t % 60 + d), None,
                    Stamp(WALL0 + start + t + wall_offset, boot, mono0 + start + t))
            for t in range(seconds) for d in range(2)]
    store.writer.run_sync(store_batch_job(rows, []))


def q(store: Store, sql: str) -> list[tuple[Any, ...]]:
    conn = store.reader()
    try:
        return [tuple(r) for r in conn.execute(sql).fetchall()]
    finally:
        conn.close()


def test_minutes_roll_up_before_raw_readings_are_trimmed_and_steps_of_the_wall_clock_do_not_matter(
        store: Store) -> None:
    readings(store, 0, 90)
    readings(store, 90, 90, wall_offset=-10 * 86_400)  # NTP steps the wall clock ten days back
    now = Stamp(WALL0 + 190, "boot-a", 190.0)
    # count retention wants all but 10 readings gone: everything is rolled up first, nothing lost
    asyncio.run(run_retention(store, PipelineSettings(readings_max_rows=10, readings_max_age_s=0),
                              TelemetrySettings(), lambda: now))
    assert q(store, "SELECT count(*) FROM readings") == [(10,)]
    minute = q(store, "SELECT n, vmin, vmax, vsum, vlast FROM telemetry_rollups WHERE res = 60 AND device = 'l1/d0' "
                      "ORDER BY bucket")
    assert [m[0] for m in minute] == [60, 60, 60]  # boot-clock minutes: the wall step split nothing
    assert minute[0][1:] == (0.0, 59.0, sum(range(60)), 59.0)
    hour = q(store, "SELECT n FROM telemetry_rollups WHERE res = 3600 AND device = 'l1/d1'")
    assert hour == [(180,)]  # every reading counted once: 3 minutes of 60


def test_rollups_kept_by_tier_on_the_boot_clock_and_packed_for_the_cloud(store: Store) -> None:
    readings(store, 0, 120)
    settings = TelemetrySettings(keep_1m_s=600.0, keep_1h_s=10 * 86_400.0)
    ob = OutboxSettings(pack_wait_s=1.0)
    now = [Stamp(WALL0 + 130, "boot-a", 130.0)]
    service = OutboxService(store, ob, Outbox(store.writer, ob), now=lambda: now[0], telemetry=settings)

    def tick() -> None:
        asyncio.run(run_retention(store, PipelineSettings(), settings, lambda: now[0]))
        asyncio.run(service.tick(expire=False))

    tick()
    assert q(store, "SELECT count(*) FROM telemetry_rollups WHERE res = 60") == [(4,)]
    assert q(store, "SELECT count(*) FROM outbox WHERE kind = 'telemetry_1m'") == [(0,)]  # waits to fill a record
    now[0] = Stamp(WALL0 + 800, "boot-a", 800.0)  # 10 minutes later: packed, then trimmed locally
    tick()
    tick()
    (payload, enc), = q(store, "SELECT payload, enc FROM outbox WHERE kind = 'telemetry_1m'")
    doc = json.loads(codec.unpack(payload, enc))
    assert doc["res_s"] == 60 and len(doc["rows"]) == 4
    row = dict(zip(doc["columns"], doc["rows"][0], strict=True))
    assert row["n"] == 60 and row["boot"] == "boot-a" and row["mean"] == sum(range(60)) / 60
    assert q(store, "SELECT count(*) FROM telemetry_rollups WHERE res = 60") == [(0,)]  # past keep_1m_s
    assert q(store, "SELECT count(*) FROM telemetry_rollups WHERE res = 3600") == [(2,)]  # the hour stays
    # a reboot into 1970 (no RTC): the hour rows of the earlier boot are not trimmed early
    now[0] = Stamp(500.0, "boot-b", 20.0)
    tick()
    assert q(store, "SELECT count(*) FROM telemetry_rollups WHERE res = 3600") == [(2,)]
    # raw readings go to the cloud only while the uplink is up, and only the recent past
    assert q(store, "SELECT count(*) FROM outbox WHERE kind = 'telemetry_raw'") == [(0,)]
    readings(store, 0, 30, boot="boot-b", mono0=20.0, wall_offset=5 * 86_400)  # NTP has set the clock: 5 days on
    store.writer.run_sync(lambda db: db.conn.execute(
        "INSERT INTO links (name, state, detail, since, updated_at) VALUES ('uplink', 'up', '', 0, 0)"))
    now[0] = Stamp(WALL0 + 5 * 86_400 + 40, "boot-b", 60.0)
    asyncio.run(service.tick(expire=False))
    (payload, enc), = q(store, "SELECT payload, enc FROM outbox WHERE kind = 'telemetry_raw'")
    raw = json.loads(codec.unpack(payload, enc))["readings"]
    assert len(raw) == 60 and {r["boot"] for r in raw} == {"boot-b"}  # boot-a's readings are hours old


def test_plan_answers_whether_a_budget_fits_and_what_to_change(tmp_path: Path) -> None:
    def plan(*args: str) -> tuple[int, dict[str, Any]]:
        proc = subprocess.run([sys.executable, "-m", "agent", "plan", "--state-dir", str(tmp_path), "--json", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode in (0, 1), proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    code, fits = plan("--readings-per-s", "200", "--decisions-per-reading", "3", "--days", "30")
    assert code == 0 and fits["fits"] and fits["total_bytes"] <= 1024**3
    cfg = tmp_path / "small.toml"
    cfg.write_text(f"[outbox]\ndisk_budget_bytes = {fits['outbox_bytes'] // 2}\n")  # half of what 30 days need
    code, small = plan("--config", str(cfg), "--readings-per-s", "200", "--decisions-per-reading", "3", "--days", "30")
    assert code == 1 and not small["fits"] and small["days_until_shedding"] < 30
    assert any("disk_budget_bytes" in a for a in small["advice"]) and any("window_s" in a for a in small["advice"])
