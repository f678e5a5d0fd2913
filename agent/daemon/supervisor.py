"""The supervisor: heartbeat into SQLite and systemd's watchdog, only while everything is alive, and
the record of services that failed and were restarted.

A WATCHDOG=1 ping means "every service task is running and the loop is responsive and the writer
commits". A service that fails is restarted in place with the backoff (see ``Daemon._run_service``):
restarting the whole process would not help (a retained message that makes a service fail comes
back after every start), and systemd gives up on a unit that keeps failing. A service task only ends
for good when the storage writer is gone; then the supervisor stops the daemon with an error instead
of pinging, so systemd restarts it cleanly: a new process is what reopens the database.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import asdict, dataclass

import sqlite_utils

from agent import jsonsafe
from agent.daemon.context import Context
from agent.daemon.heartbeat import WearMeter, beat_job
from agent.daemon.notify import watchdog_interval
from agent.errors import AgentError, StorageError
from agent.logs import get_logger
from agent.storage.store import error_job, kv_set_job
from agent.storage.writer import WriteJob

log = get_logger("daemon")

SERVICES_KEY = "daemon.services"  # kv: what `status` reads about failed and restarted services
RESTART_MIN_S = 1.0
RESTART_MAX_S = 60.0
STABLE_RUN_S = 60.0  # a service that ran this long before it failed starts its backoff afresh


class ServiceDied(Exception):
    """A service task ended although nobody asked it to stop."""


@dataclass
class ServiceRecord:
    state: str = "running"  # running | restarting
    restarts: int = 0
    last_error: str = ""
    last_failed_at: float | None = None


class ServiceHealth:
    """Which services failed, how often, and why: logged, in the errors log, and (kv) for ``status``."""

    def __init__(self, ctx: Context, names: list[str]) -> None:
        self.ctx = ctx
        self.services = {name: ServiceRecord() for name in names}

    async def started(self) -> None:
        """A fresh daemon: every service runs, none failed yet (the previous run's record is replaced)."""
        await self._save()

    async def failed(self, name: str, exc: BaseException, retry_in_s: float) -> None:
        rec = self.services.setdefault(name, ServiceRecord())
        rec.state, rec.restarts, rec.last_failed_at = "restarting", rec.restarts + 1, time.time()
        rec.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("service_failed", service=name, error=str(exc)[:500], error_type=type(exc).__name__,
                  restarts=rec.restarts, retry_in_s=round(retry_in_s, 2))
        self.ctx.set_status(name, f"restarting after a failure ({rec.restarts}): {rec.last_error[:120]}")
        await self._save(error_job(name, "service_restarted",
                                   f"service '{name}' failed and is restarted in {retry_in_s:.1f} s "
                                   f"(restart {rec.restarts}): {rec.last_error}"))

    async def restarted(self, name: str) -> None:
        rec = self.services.setdefault(name, ServiceRecord())
        rec.state = "running"
        self.ctx.set_status(name, f"restarted ({rec.restarts})")
        log.info("service_restarted", service=name, restarts=rec.restarts)
        await self._save()

    async def _save(self, *extra: WriteJob) -> None:
        """Best effort: the failure may be the storage's (a full disk); the log line above has it all."""
        text = jsonsafe.dumps({n: asdict(r) for n, r in sorted(self.services.items())})
        jobs = [kv_set_job(SERVICES_KEY, text), *extra]

        def job(db: sqlite_utils.Database) -> None:
            for one in jobs:
                one(db)
        try:
            await self.ctx.store.writer.run(job)
        except AgentError as exc:
            log.warning("service_health_not_recorded", error=str(exc))


class Supervisor:
    def __init__(self, ctx: Context, tasks: dict[str, asyncio.Task[None]]) -> None:
        self.ctx = ctx
        self.tasks = tasks
        self.wear = WearMeter()
        self.watchdog_s = watchdog_interval()
        self.beats = 0

    def _period(self) -> float:
        period = self.ctx.config.agent.heartbeat_interval_s
        if self.watchdog_s is not None:
            period = min(period, self.watchdog_s)
        return period

    def check_tasks(self) -> None:
        for name, task in self.tasks.items():
            if task.done():
                exc = None if task.cancelled() else task.exception()
                raise ServiceDied(f"service '{name}' stopped unexpectedly: {exc!r}")

    async def run(self) -> None:
        last_notified = ""
        failing = False
        while True:
            self.check_tasks()
            started = time.monotonic()
            try:
                await self.ctx.store.writer.run(beat_job("running", self.ctx.status_text, self.wear.sample()))
                self.beats += 1
                if failing:
                    failing = False
                    self.ctx.status_parts.pop("storage", None)
                    log.info("heartbeat_write_recovered")
            except (StorageError, sqlite3.Error) as exc:
                if not self.ctx.store.writer.alive:
                    raise
                # e.g. a full disk: restarting would not help and would lose the in-memory state, so keep
                # running (and pinging: the writer answered) and say so; status shows a stale heartbeat
                if not failing:
                    failing = True
                    log.error("heartbeat_write_failed", error=str(exc))
                    self.ctx.set_status("storage", f"cannot write the state database: {exc}")
            if self.watchdog_s is not None:
                self.ctx.notifier.watchdog()
            if self.ctx.status_text != last_notified:
                last_notified = self.ctx.status_text
                self.ctx.notifier.status(last_notified)
            await asyncio.sleep(max(0.0, self._period() - (time.monotonic() - started)))
