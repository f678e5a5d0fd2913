"""ReleaseWatcher: the daemon notices releases installed by another process (``edge-agent install``).

Polls the ``generation`` counter with a reader connection (one indexed row, ~every 0.5 s) and calls
every registered async listener ``on_releases_changed()`` when it moves. Also the daemon's keeper of
trusted time: it persists the system clock as last-known-good time now and then, so a later clock
reset to 1970 cannot expire or replay releases.

The composition root registers the runtimes' services as listeners; ``watcher.releases`` is the
:class:`ReleaseStore` everything in the daemon stages, activates and rolls back through.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

from agent.errors import AgentError
from agent.logs import get_logger
from agent.storage import Store
from agent.trust.releases import ReleaseStore, generation, seen_generation_job
from agent.trust.timekeeper import advance_job

log = get_logger("trust")

POLL_INTERVAL_S = 0.5
TIME_PERSIST_INTERVAL_S = 300.0


class ReleasesListener(Protocol):
    async def on_releases_changed(self) -> None: ...


class ReleaseWatcher:
    name = "releases"

    def __init__(self, releases: ReleaseStore, *, on_status: Callable[[str], None] | None = None,
                 poll_s: float = POLL_INTERVAL_S) -> None:
        """``on_status`` gets a short "what it is doing" phrase (the daemon's STATUS= line)."""
        self.releases = releases
        self.store: Store = releases.store
        self.on_status = on_status
        self.poll_s = poll_s
        self.generation = -1
        self._listeners: list[ReleasesListener] = []
        self._conn: sqlite3.Connection | None = None
        self._changed = asyncio.Event()

    def add_listener(self, listener: ReleasesListener) -> None:
        """Register an object with ``async on_releases_changed()``; called once per observed change."""
        self._listeners.append(listener)

    def remove_listener(self, listener: ReleasesListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def poke(self) -> None:
        """Check now instead of at the next poll (after this process changed releases itself)."""
        self._changed.set()

    def _read_generation(self) -> int:
        if self._conn is None:
            self._conn = self.store.reader()
        return generation(self._conn)

    async def run(self) -> None:
        last_time_persist = float("-inf")  # persist at once, then every TIME_PERSIST_INTERVAL_S
        try:
            while True:
                try:
                    gen = self._read_generation()
                except (sqlite3.Error, AgentError) as exc:
                    log.error("release_generation_read_failed", error=str(exc))
                    if self._conn is not None:
                        self._conn.close()
                        self._conn = None
                    gen = self.generation
                if gen != self.generation:
                    await self._notify(gen)
                if time.monotonic() - last_time_persist >= TIME_PERSIST_INTERVAL_S:
                    # the stored time follows what we measured since our last persist; the first
                    # persist of a run has measured nothing (one bounded step, see timekeeper)
                    elapsed = None if last_time_persist == float("-inf") else time.monotonic() - last_time_persist
                    last_time_persist = time.monotonic()
                    await self.store.writer.run(advance_job(elapsed_s=elapsed))
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), self.poll_s)
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    async def _notify(self, gen: int) -> None:
        previous, self.generation = self.generation, gen
        log.info("releases_changed", generation=gen, previous=previous, listeners=len(self._listeners))
        for listener in list(self._listeners):
            try:
                await listener.on_releases_changed()
            except Exception as exc:  # one broken listener must not stop the others or the watcher
                log.error("releases_listener_failed", listener=type(listener).__name__, error=str(exc),
                          error_type=type(exc).__name__)
        if self.on_status is not None:
            self.on_status(f"generation {gen}")
        await self.store.writer.run(seen_generation_job(gen))
