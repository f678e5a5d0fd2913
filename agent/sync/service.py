"""The ``outbox`` service: pulls the decision log into the outbox, expires records, keeps the budget."""

from __future__ import annotations

import asyncio
import time

from agent import clock
from agent.config.sync import OutboxSettings
from agent.errors import StorageError
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.storage import Store
from agent.sync.outbox import (
    Outbox,
    enforce_budget,
    expire_job,
    measure_pages,
    page_ratio_job,
    pull_decisions_job,
    pull_events_job,
)

log = get_logger("outbox")

PULL_INTERVAL_S = 1.0
MAX_BACKOFF_S = 60.0


class OutboxService:
    name = "outbox"

    def __init__(self, store: Store, settings: OutboxSettings, outbox: Outbox, now: clock.Clock = clock.now) -> None:
        self.store = store
        self.settings = settings
        self.outbox = outbox
        self.now = now

    async def tick(self, expire: bool) -> None:
        budget = self.settings.disk_budget_bytes
        pulls = [pull_events_job] + ([pull_decisions_job] if self.settings.pull_decisions else [])
        for pull in pulls:
            while True:
                n: int = await self.store.writer.run(pull(budget))
                if n:
                    self.outbox.changed.set()
                if n < 2000:
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
