"""Scheduled module runs across restarts: jobs rebuilt from SQLite, coalesced catch-up, misfire grace.

Each "life" is a real runtime on a real state dir (Store reopened, scheduler rebuilt); the offline gap
is faked by moving the persisted last-run time back, exactly what a powered-off gateway looks like.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from agent.runtime.scheduler import ModuleScheduler
from agent.storage import Store
from agent_devkit.examples import example
from tests.modules.support import load, make_runtime, rows

HOUR = 3600.0


def predicate(schedule: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "module", "name": "tick", "version": 1, "trigger": {"type": "schedule", "schedule": schedule}}


async def _wait_runs(store: Store, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rows(store, "SELECT count(*) FROM module_runs")[0][0] >= count:
            return
        await asyncio.sleep(0.05)


def life(state_dir: Path, schedule: dict[str, Any], *, expect_runs: int | None, fire_now: bool = False,
         settle_s: float = 0.5, **settings: Any) -> dict[str, Any]:
    """Start runtime + scheduler, optionally fire the job once (as APScheduler would), wait, stop."""
    async def go() -> dict[str, Any]:
        store, rt = make_runtime(state_dir, **settings)
        sched = ModuleScheduler(rt)
        try:
            await load(rt, "tick", example("counter"), predicate(schedule))
            await sched.start()
            if fire_now:
                await sched._fire("tick")
            if expect_runs is not None:
                await _wait_runs(store, expect_runs)
            await asyncio.sleep(settle_s)  # a duplicate would show up here
            nxt = sched.next_run("tick")
            return {"next_run": nxt.timestamp() if nxt else None, "missed": sched.missed}
        finally:
            sched.stop()
            await rt.close()
            store.close()
    return asyncio.run(go())


def runs(state_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    store = Store.open(state_dir)
    try:
        return [(o, k, json.loads(t)) for o, k, t in
                rows(store, "SELECT outcome, trigger_kind, trigger FROM module_runs ORDER BY id")]
    finally:
        store.close()


def shift_last_run(state_dir: Path, seconds_ago: float) -> float:
    """Pretend the gateway was off: the last recorded run happened ``seconds_ago``."""
    store = Store.open(state_dir)
    try:
        last = time.time() - seconds_ago
        store.writer.run_sync(lambda db: db.execute("UPDATE module_schedules SET last_run_wall = ?", (last,)))
        return last
    finally:
        store.close()


def test_interval_reboot_while_offline_runs_exactly_one_catch_up(tmp_path: Path) -> None:
    sched = {"interval_s": HOUR}
    first = life(tmp_path, sched, expect_runs=1, fire_now=True)
    assert [(o, k) for o, k, _ in runs(tmp_path)] == [("ok", "schedule")]
    assert first["next_run"] is not None and first["next_run"] > time.time() + HOUR - 120

    # the gateway was off for ~3 h: 3 fire times missed, the latest only ~100 s ago
    last = shift_last_run(tmp_path, 3 * HOUR + 100)
    second = life(tmp_path, sched, expect_runs=2)
    got = runs(tmp_path)
    assert len(got) == 2, got  # exactly one catch-up, not three
    outcome, kind, trig = got[1]
    assert (outcome, kind, trig["catch_up"], trig["missed"]) == ("ok", "schedule", True, 3)
    assert abs(json.loads(json.dumps(trig))["wall"] - time.time()) < 600
    # the schedule keeps its phase: next fire = last + 4 intervals, ~1 h from now
    assert second["next_run"] is not None and abs(second["next_run"] - (last + 4 * HOUR)) < 1.0

    # restart again right away: the catch-up was recorded, so nothing runs twice
    life(tmp_path, sched, expect_runs=None, settle_s=0.5)
    assert len(runs(tmp_path)) == 2

    store = Store.open(tmp_path)
    try:
        (row,) = rows(store, "SELECT spec, runs, last_run_wall FROM module_schedules WHERE name = 'tick'")
        assert row[0] == "interval:3600" and row[1] == 2
        assert abs(row[2] - (last + 3 * HOUR)) < 1.0  # the persisted last run is the scheduled time
    finally:
        store.close()


def test_catch_up_older_than_the_grace_is_skipped_and_recorded(tmp_path: Path) -> None:
    sched = {"interval_s": HOUR}
    life(tmp_path, sched, expect_runs=1, fire_now=True, misfire_grace_s=60)
    last = shift_last_run(tmp_path, HOUR + 600)  # the one missed fire time is 600 s late > 60 s grace
    second = life(tmp_path, sched, expect_runs=2, misfire_grace_s=60)
    got = runs(tmp_path)
    assert [(o, k) for o, k, _ in got] == [("ok", "schedule"), ("missed", "schedule")]
    assert second["missed"] == 1
    assert second["next_run"] is not None and abs(second["next_run"] - (last + 2 * HOUR)) < 1.0


def test_cron_catch_up_and_changed_schedule_starts_fresh(tmp_path: Path) -> None:
    cron = {"cron": "*/5 * * * *"}
    life(tmp_path, cron, expect_runs=1, fire_now=True)
    shift_last_run(tmp_path, 2 * HOUR)  # ~24 missed five-minute slots, the latest < 5 min ago
    life(tmp_path, cron, expect_runs=2)
    got = runs(tmp_path)
    assert len(got) == 2
    assert got[1][2]["catch_up"] is True and got[1][2]["missed"] >= 23
    assert got[1][2]["schedule"] == "cron:*/5 * * * *"

    # a new schedule for the module: the old last-run time does not apply, no catch-up
    shift_last_run(tmp_path, 5 * HOUR)
    third = life(tmp_path, {"interval_s": HOUR}, expect_runs=None, settle_s=0.5)
    assert len(runs(tmp_path)) == 2
    assert third["next_run"] is not None and third["next_run"] > time.time() + HOUR - 120


def test_swap_keeps_the_schedule_and_removal_drops_it(tmp_path: Path) -> None:
    async def go() -> tuple[float | None, float | None, bool]:
        store, rt = make_runtime(tmp_path)
        sched = ModuleScheduler(rt)
        try:
            await load(rt, "tick", example("counter"), predicate({"interval_s": HOUR}))
            await sched.start()
            before = sched.next_run("tick")
            await load(rt, "tick", example("moving_avg"), predicate({"interval_s": HOUR}), version=2)
            after = sched.next_run("tick")
            await rt.unload("tick")
            gone = sched.next_run("tick") is None
            return (before.timestamp() if before else None, after.timestamp() if after else None, gone)
        finally:
            sched.stop()
            store.close()

    before, after, gone = asyncio.run(go())
    assert before is not None and before == after
    assert gone


def test_clock_behind_the_last_run_starts_fresh_instead_of_pausing(tmp_path: Path) -> None:
    """No RTC, booted at "1970": the persisted last run looks like the future. The schedule must not wait
    for the clock to catch up; it starts afresh (first run one interval from now), with no catch-up."""
    sched = {"interval_s": HOUR}
    life(tmp_path, sched, expect_runs=1, fire_now=True)
    shift_last_run(tmp_path, -10 * HOUR)
    again = life(tmp_path, sched, expect_runs=None, settle_s=0.3)
    assert len(runs(tmp_path)) == 1
    assert again["next_run"] is not None and abs(again["next_run"] - (time.time() + HOUR)) < 120
