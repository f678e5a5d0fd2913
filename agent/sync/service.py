"""The ``outbox`` service: seals audit windows, packs events and telemetry, expires records, keeps the budget.

It runs beside the control loop, never in its way: the decision path only counts (``audit.py``); all
packing, compression and shedding happens here, in small write jobs of its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent import clock
from agent.config.sync import OutboxSettings
from agent.config.telemetry import TelemetrySettings
from agent.errors import StorageError
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.storage import Store
from agent.sync.auditwin import seal_job, seal_legacy_job
from agent.sync.outbox import (
    Outbox,
    enforce_budget,
    expire_job,
    measure_pages,
    page_ratio_job,
    pull_events_job,
)
from agent.sync.telemetry import pack_raw_job, pack_rollups_job

log = get_logger("outbox")

PULL_INTERVAL_S = 1.0
MAX_BACKOFF_S = 60.0


class OutboxService:
    name = "outbox"

    def __init__(self, store: Store, settings: OutboxSettings, outbox: Outbox, now: clock.Clock = clock.now,
                 telemetry: TelemetrySettings | None = None) -> None:
        self.store = store
        self.settings = settings
        self.outbox = outbox
        self.now = now
        self.telemetry = telemetry or TelemetrySettings()

    def _pack_job(self) -> Any:
        """Everything that packs into the outbox, as ONE write job (one commit per tick when idle). Each part
        is bounded; returns (records packed, whether some part had a full chunk: a backlog, go again)."""
        budget = self.settings.disk_budget_bytes
        send = self.settings.pull_decisions
        now = self.now()
        parts: list[tuple[Any, int]] = [
            (seal_job(now, budget, send), 20),
            (seal_legacy_job(budget, send), 500),
            (pull_events_job(budget, now, self.settings.pack_wait_s), 1000),
        ]
        if self.telemetry.cloud_rollups:
            parts += [(pack_rollups_job(60, now, budget), 2000), (pack_rollups_job(3600, now, budget), 2000)]
        parts.append((pack_raw_job(now, self.telemetry.raw_recent_s, budget), 2000))

        def job(db: Any) -> tuple[int, bool]:
            total, more = 0, False
            for part, full in parts:
                n = int(part(db))
                total += n
                more = more or n >= full
            return total, more
        return job

    async def tick(self, expire: bool) -> None:
        budget = self.settings.disk_budget_bytes
        while True:
            n, more = await self.store.writer.run(self._pack_job())
            if n:
                self.outbox.changed.set()
            if not more:
                break
        if expire:
            await self.store.writer.run(expire_job(self.settings, self.now()))
            pages, accounted = await run_blocking(measure_pages, self.store.path)
            await self.store.writer.run(page_ratio_job(pages, accounted))
            await self.store.writer.run(lambda db: enforce_budget(db.conn, budget))

    async def run(self) -> None:
        last_expiry = 0.0
        backoff = 0.0
        while True:
            due = time.monotonic() - last_expiry >= self.settings.maintenance_interval_s
            try:
                await self.tick(due)
            except StorageError as exc:
                # a full disk (or a failing one) is not a reason to stop the daemon: nothing was
                # copied or deleted (the cursors moved in the same transactions), so just try again later
                backoff = min(MAX_BACKOFF_S, max(PULL_INTERVAL_S, backoff * 2))
                log.error("outbox_maintenance_failed", error=str(exc), code=exc.code, retry_in_s=backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            if due:
                last_expiry = time.monotonic()
            await asyncio.sleep(PULL_INTERVAL_S)
