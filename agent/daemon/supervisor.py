"""The supervisor: heartbeat into SQLite and systemd's watchdog, only while everything is alive.

A WATCHDOG=1 ping means "every service task is running and the loop is responsive and the writer
commits". If a service task has ended on its own, the supervisor stops the daemon with an error
instead of pinging, so systemd restarts it cleanly.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time

from agent.daemon.context import Context
from agent.daemon.heartbeat import WearMeter, beat_job
from agent.daemon.notify import watchdog_interval
from agent.errors import StorageError
from agent.logs import get_logger

log = get_logger("daemon")


class ServiceDied(Exception):
    """A service task ended although nobody asked it to stop."""


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
