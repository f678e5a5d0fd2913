"""The single SQLite writer: one thread, one connection, group commits.

Every write in the process is a *job* — a function of the ``sqlite_utils.Database`` — submitted
here. The writer thread takes whatever jobs are queued (up to ``batch_max``), runs each inside its
own SAVEPOINT of one transaction, and commits once. A failing job is rolled back alone and gets
its exception; the others commit. Callers are told "done" only after COMMIT returned, so
"store, then acknowledge" holds, and batching makes ``synchronous=FULL`` cheap (see platform notes).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from agent.errors import StorageError
from agent.logs import get_logger
from agent.storage.db import connect_writer

log = get_logger("storage")

T = TypeVar("T")
Job = Callable[[sqlite_utils.Database], Any]
WriteJob = Callable[[sqlite_utils.Database], None]
_STOP = object()


class Writer:
    """Owns the only writing connection of the process. Thread-safe to submit to."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", batch_max: int = 256) -> None:
        self.path = path
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self.commits = 0
        self.jobs = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sqlite-writer", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            raise StorageError(f"{self.path}: cannot open the database for writing: {self._start_error}")

    def stop(self) -> None:
        """Finish every queued job, then close. Idempotent."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Callable[[sqlite_utils.Database], T]) -> Future[T]:
        if not self.alive:
            raise StorageError("the database writer is not running")
        fut: Future[T] = Future()
        self._queue.put((job, fut))
        return fut

    def run_sync(self, job: Callable[[sqlite_utils.Database], T]) -> T:
        """Run a job and wait for its commit (for CLI commands and start-up)."""
        return self.submit(job).result()

    async def run(self, job: Callable[[sqlite_utils.Database], T]) -> T:
        """Run a job and await its commit without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(job))

    def _run(self) -> None:
        try:
            conn = connect_writer(self.path, self._synchronous)
            db = sqlite_utils.Database(conn)
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    break
                batch = [first]
                stop_after = False
                while len(batch) < self._batch_max:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        stop_after = True
                        break
                    batch.append(item)
                self._commit(conn, db, batch)
                if stop_after:
                    break
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, db: sqlite_utils.Database,
                batch: list[tuple[Job, Future[Any]]]) -> None:
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for i, (job, fut) in enumerate(batch):
                if not fut.set_running_or_notify_cancel():
                    continue
                conn.execute(f"SAVEPOINT job{i}")
                try:
                    result = job(db)
                except BaseException as exc:
                    conn.execute(f"ROLLBACK TO job{i}")
                    conn.execute(f"RELEASE job{i}")
                    outcomes.append((fut, False, exc))
                else:
                    conn.execute(f"RELEASE job{i}")
                    outcomes.append((fut, True, result))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("db_commit_failed", error=str(exc), jobs=len(batch), path=str(self.path))
            err = StorageError(f"{self.path}: commit failed ({exc}); nothing of this write was stored")
            for _, fut in batch:
                if fut.running():
                    fut.set_exception(err)
            return
        self.commits += 1
        self.jobs += len(outcomes)
        for fut, ok, value in outcomes:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
