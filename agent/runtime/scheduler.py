"""Scheduled module runs: APScheduler 3.11 ``AsyncIOScheduler`` (UTC), jobs rebuilt from our own SQLite.

Why not APScheduler's job store: it needs SQLAlchemy and deletes jobs whose callable moved. The
agent keeps, per scheduled module, its schedule key and the *scheduled* time of its last recorded run
(``module_schedules``, written in the same transaction as the run row). At start-up — and whenever a
module version is activated — the job is rebuilt from that row:

- interval N s: fire times are ``last_run + k·N``; cron: the crontab's times after ``last_run``;
- if fire times were missed while the agent was down, ``coalesce=True`` folds them into ONE run,
  and it runs only if the most recent missed time is at most ``[modules].misfire_grace_s`` old
  (``misfire_grace_time``); otherwise it is recorded as ``missed`` and the schedule carries on;
- a module with no recorded run (new, or its schedule changed) starts fresh: first run after one
  interval / at the next cron time. ``max_instances=1``: a run never overlaps the previous one.

A run that was in progress when the agent died was not recorded, so it is caught up (at least once);
a recorded run is never repeated.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.events import EVENT_JOB_MISSED, EVENT_JOB_SUBMITTED, JobEvent, JobExecutionEvent, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from agent.logs import get_logger
from agent.offload import run_blocking
from agent.runtime.contract import make_trigger
from agent.runtime.modules import ModuleRuntime
from agent.runtime.registry import LoadedModule
from agent.runtime.spec import Schedule

log = get_logger("modules")

JOB_PREFIX = "module:"
NUDGE_S = 30.0
CLOCK_SLACK_S = 60.0


def _dt(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)


class ModuleScheduler:
    def __init__(self, runtime: ModuleRuntime) -> None:
        self.runtime = runtime
        self._sched: AsyncIOScheduler | None = None
        self._persisted: dict[str, tuple[str, float | None]] = {}   # name -> (schedule key, last run)
        self._scheduled_for: dict[str, float] = {}
        self._catch_up: dict[str, int] = {}
        self._nudger: asyncio.Task[None] | None = None
        self.missed = 0
        runtime.registry.add_listener(self._on_change)

    @property
    def running(self) -> bool:
        return self._sched is not None

    async def start(self) -> None:
        """Load persisted last-run times, start APScheduler, and (re)build a job per loaded module."""
        logging.getLogger("apscheduler").setLevel(logging.ERROR)  # our own structlog events say it all
        self._persisted = await run_blocking(self._read_persisted)
        sched = AsyncIOScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1, "misfire_grace_time": self.runtime.settings.misfire_grace_s})
        sched.add_listener(self._on_event, EVENT_JOB_SUBMITTED | EVENT_JOB_MISSED)
        sched.start()
        self._sched = sched
        self._nudger = asyncio.get_running_loop().create_task(self._nudge(), name="module-scheduler-nudge")
        for loaded in self.runtime.registry.all():
            self._schedule(loaded)
        log.info("module_scheduler_started", jobs=len(sched.get_jobs()))

    async def _nudge(self) -> None:
        """Re-check due jobs against the wall clock now and then: APScheduler sleeps on a monotonic timer
        computed from the wall clock, so after NTP steps the clock forward (a gateway that booted at 1970)
        it would otherwise oversleep by as much as the jump."""
        while True:
            await asyncio.sleep(NUDGE_S)
            if self._sched is not None:
                self._sched.wakeup()

    def stop(self) -> None:
        if self._nudger is not None:
            self._nudger.cancel()
            self._nudger = None
        if self._sched is not None:
            self._sched.shutdown(wait=False)
            self._sched = None

    def _read_persisted(self) -> dict[str, tuple[str, float | None]]:
        conn = self.runtime.store.reader()
        try:
            rows = conn.execute("SELECT name, spec, last_run_wall FROM module_schedules").fetchall()
        finally:
            conn.close()
        return {str(n): (str(s), None if w is None else float(w)) for n, s, w in rows}

    def next_run(self, name: str) -> datetime | None:
        job = self._sched.get_job(JOB_PREFIX + name) if self._sched is not None else None
        return None if job is None else job.next_run_time

    def _on_change(self, name: str, old: LoadedModule | None, new: LoadedModule | None) -> None:
        if self._sched is None:
            return
        if new is None or new.spec.schedule is None:
            if self._sched.get_job(JOB_PREFIX + name) is not None:
                self._sched.remove_job(JOB_PREFIX + name)
            return
        if old is not None and old.spec.schedule == new.spec.schedule and self._sched.get_job(JOB_PREFIX + name):
            return  # same schedule: a new version keeps the running job and its timing
        self._schedule(new)

    def _schedule(self, loaded: LoadedModule) -> None:
        schedule = loaded.spec.schedule
        if self._sched is None or schedule is None:
            return
        now = time.time()
        key, last = self._persisted.get(loaded.name, ("", None))
        if key != schedule.key():
            last = None
        if last is not None and last > now + CLOCK_SLACK_S:
            # the last run is in the future: the clock went back (no RTC, booted at 1970, no NTP yet).
            # Anchoring on it would pause the schedule until the clock caught up; start fresh instead.
            log.warning("module_schedule_clock_behind", module=loaded.name, last_run=_dt(last).isoformat(),
                        now=_dt(now).isoformat())
            last = None
        trigger, first, missed = self._plan(schedule, last, now)
        grace = self.runtime.settings.misfire_grace_s
        if missed:
            self._catch_up[loaded.name] = missed
            late = now - first_missed_latest(schedule, last, now)
            log.info("module_schedule_catch_up", module=loaded.name, missed=missed, late_s=round(late, 1),
                     will_run=late <= grace)
        self._sched.add_job(self._fire, trigger, args=[loaded.name], id=JOB_PREFIX + loaded.name,
                            name=loaded.name, replace_existing=True, next_run_time=_dt(first),
                            coalesce=True, max_instances=1, misfire_grace_time=grace)
        log.info("module_scheduled", module=loaded.name, schedule=schedule.describe(),
                 last_run=_dt(last).isoformat() if last else None, first_run=_dt(first).isoformat())

    @staticmethod
    def _plan(schedule: Schedule, last: float | None, now: float) -> tuple[Any, float, int]:
        """(APScheduler trigger, first fire time, how many fire times were missed before now)."""
        if schedule.interval_s is not None:
            n = schedule.interval_s
            anchor = last + n if last is not None else now + n
            trigger = IntervalTrigger(seconds=n, start_date=_dt(anchor), timezone=UTC)
            missed = math.floor((now - anchor) / n) + 1 if anchor <= now else 0
            return trigger, anchor, missed
        assert schedule.cron is not None
        trigger = CronTrigger.from_crontab(schedule.cron, timezone=UTC)
        base = _dt(last) + timedelta(microseconds=1) if last is not None else _dt(now)
        first_dt = trigger.get_next_fire_time(None, base)
        first = first_dt.timestamp()
        missed = 0
        if first <= now:
            t: datetime | None = first_dt
            while t is not None and t.timestamp() <= now and missed < 100000:
                missed += 1
                t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
        return trigger, first, missed

    def _on_event(self, event: JobEvent) -> None:
        if not event.job_id.startswith(JOB_PREFIX):
            return
        name = event.job_id[len(JOB_PREFIX):]
        if isinstance(event, JobSubmissionEvent) and event.scheduled_run_times:
            self._scheduled_for[name] = event.scheduled_run_times[-1].timestamp()
        elif isinstance(event, JobExecutionEvent) and event.code == EVENT_JOB_MISSED:
            self.missed += 1
            self._catch_up.pop(name, None)
            when = event.scheduled_run_time
            log.warning("module_schedule_missed", module=name, scheduled_for=when.isoformat(),
                        grace_s=self.runtime.settings.misfire_grace_s)
            asyncio.get_running_loop().create_task(self._record_missed(name, when.timestamp()))

    async def _record_missed(self, name: str, fire: float) -> None:
        loaded = self.runtime.registry.get(name)
        if loaded is None:
            return
        late = time.time() - fire

        def job(db: Any) -> None:
            db.execute("INSERT INTO module_runs (name, version, sha256, trigger_kind, trigger, started_wall,"
                       " boot_id, mono, duration_ms, outcome, error) VALUES (?, ?, ?, 'schedule', ?, ?, '', 0, 0,"
                       " 'missed', ?)",
                       (name, loaded.version, loaded.sha256, f'{{"scheduled_for":{fire}}}', time.time(),
                        f"scheduled run at {_dt(fire).isoformat()} skipped: the agent was down and it is "
                        f"{late:.0f} s late, more than [modules].misfire_grace_s"))
        await self.runtime.store.writer.run(job)

    async def _fire(self, name: str) -> None:
        fire = self._scheduled_for.pop(name, time.time())
        missed = self._catch_up.pop(name, 0)
        loaded = self.runtime.registry.get(name)
        extra: dict[str, Any] = {"scheduled_for": _dt(fire).isoformat().replace("+00:00", "Z")}
        if loaded is not None and loaded.spec.schedule is not None:
            extra["schedule"] = loaded.spec.schedule.key()
        if missed:
            extra.update(catch_up=True, missed=missed)
        trigger = make_trigger("schedule", time.time(), **extra)
        await self.runtime.run_triggered(name, trigger, None, schedule_fire=fire)
        self._persisted[name] = (extra.get("schedule", ""), fire)


def first_missed_latest(schedule: Schedule, last: float | None, now: float) -> float:
    """The most recent fire time at or before ``now`` (what a coalesced catch-up run stands for)."""
    if schedule.interval_s is not None:
        n = schedule.interval_s
        anchor = last + n if last is not None else now + n
        if anchor > now:
            return anchor
        return anchor + math.floor((now - anchor) / n) * n
    assert schedule.cron is not None
    trigger = CronTrigger.from_crontab(schedule.cron, timezone=UTC)
    base = _dt(last) + timedelta(microseconds=1) if last is not None else _dt(now)
    t = trigger.get_next_fire_time(None, base)
    latest = t
    while t is not None and t.timestamp() <= now:
        latest = t
        t = trigger.get_next_fire_time(t, t + timedelta(microseconds=1))
    return float(latest.timestamp())
