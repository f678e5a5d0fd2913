"""Counted rejects: every piece of outside input the agent refused, and every handler that failed.

A reject is the agent doing its job (a hostile or broken message was acknowledged and dropped, and
nothing stored suffered), but a technician must be able to see it: ``status`` lists the counts per
source and code with the last one's detail. Counting must never cost the input path a write per
message (a flood of garbage would become a flood of commits), so counts are kept in memory and
written as one upsert at most every ``flush_s`` seconds; a kill loses at most that last interval of
counts, never anything else (bus readings refused are also kept one row each, with their payload, in
``rejects``). ``note`` never raises and never blocks: it is called from message handlers.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import sqlite_utils

from agent.errors import AgentError
from agent.handlers import HANDLER_FAILED
from agent.logs import get_logger
from agent.storage.writer import Writer

log = get_logger("storage")

FLUSH_S = 1.0
MAX_DETAIL = 500

__all__ = ["HANDLER_FAILED", "RejectCounter", "upsert_job"]


@dataclass
class _Pending:
    count: int
    first_at: float
    last_at: float
    detail: str


class RejectCounter:
    """Counts per (source, code); thread-safe; flushed through the writer in the background."""

    def __init__(self, writer: Writer, *, flush_s: float = FLUSH_S) -> None:
        self.writer = writer
        self.flush_s = flush_s
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._scheduled = False
        self.total: dict[tuple[str, str], int] = {}  # since this process started (tests, benchmarks)

    def note(self, source: str, code: str, detail: str) -> None:
        """Count one reject; the detail of the latest one per (source, code) is kept for ``status``."""
        now = time.time()
        key = (source, code)
        with self._lock:
            self.total[key] = self.total.get(key, 0) + 1
            item = self._pending.get(key)
            if item is None:
                self._pending[key] = _Pending(1, now, now, detail[:MAX_DETAIL])
            else:
                item.count += 1
                item.last_at = now
                item.detail = detail[:MAX_DETAIL]
            if self._scheduled:
                return
            self._scheduled = True
        try:
            asyncio.get_running_loop().call_later(self.flush_s, self._flush_soon)
        except RuntimeError:  # no loop in this thread (a CLI command, the offload pool): write now
            self._flush_soon()

    def count(self, source: str, code: str | None = None) -> int:
        """Rejects noted by this process for ``source`` (and ``code``)."""
        with self._lock:
            return sum(n for (s, c), n in self.total.items() if s == source and code in (None, c))

    def _take(self) -> dict[tuple[str, str], _Pending]:
        with self._lock:
            pending, self._pending = self._pending, {}
            self._scheduled = False
        return pending

    def flush_now(self) -> None:
        """Queue what is counted now for the writer, without waiting (a closing store)."""
        self._flush_soon()

    def _flush_soon(self) -> None:
        pending = self._take()
        if not pending:
            return
        try:
            fut = self.writer.submit(upsert_job(pending))
        except AgentError as exc:  # the writer is gone (stopping): the counts die with the process
            log.warning("reject_counts_not_stored", error=str(exc), rejects=sum(p.count for p in pending.values()))
            return
        fut.add_done_callback(lambda f: self._failed(pending, f.exception()) if f.exception() else None)

    def _failed(self, pending: dict[tuple[str, str], _Pending], exc: BaseException | None) -> None:
        """A full disk, say: keep the counts for the next flush rather than losing them."""
        log.warning("reject_counts_not_stored", error=str(exc), rejects=sum(p.count for p in pending.values()))
        with self._lock:
            for key, item in pending.items():
                mine = self._pending.get(key)
                if mine is None:
                    self._pending[key] = item
                else:
                    mine.count += item.count
                    mine.first_at = min(mine.first_at, item.first_at)

    async def flush(self) -> None:
        """Write what is counted now and wait for the commit (shutdown, tests)."""
        pending = self._take()
        if pending:
            await self.writer.run(upsert_job(pending))


def upsert_job(pending: dict[tuple[str, str], _Pending]) -> Callable[[sqlite_utils.Database], None]:
    rows = [(s, c, p.count, p.first_at, p.last_at, p.detail) for (s, c), p in pending.items()]

    def job(db: sqlite_utils.Database) -> None:
        db.conn.executemany(
            "INSERT INTO input_rejects (source, code, count, first_at, last_at, last_detail) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(source, code) DO UPDATE SET count = count + excluded.count,"
            " last_at = max(last_at, excluded.last_at), last_detail = excluded.last_detail", rows)
    return job
