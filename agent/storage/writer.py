"""The single SQLite writer: one thread, one connection, group commits.

Every write in the process is a *job* — a function of the ``sqlite_utils.Database`` — submitted
here. The writer thread takes whatever jobs are queued (up to ``batch_max``), runs each inside its
own SAVEPOINT of one transaction, and commits once. A failing job is rolled back alone and gets
its exception; the others commit. Callers are told "done" only after COMMIT returned, so
"store, then acknowledge" holds, and batching makes ``synchronous=FULL`` cheap (one commit per row
manages a few thousand rows/s with FULL; grouped, tens of thousands).
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

from agent.errors import StorageError, StorageFull
from agent.logs import get_logger
from agent.storage.db import connect_writer

log = get_logger("storage")

T = TypeVar("T")
Job = Callable[[sqlite_utils.Database], Any]
WriteJob = Callable[[sqlite_utils.Database], None]
_STOP = object()



def _disk_full(exc: BaseException | None) -> bool:
    """SQLITE_FULL anywhere in the chain (a job's error may have taken the transaction with it)."""
    while exc is not None:
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc):
            return True
        exc = exc.__cause__
    return False

class _BatchLost(Exception):
    """The transaction of a batch ended inside a job; nothing of the batch can be trusted as stored."""


class Writer:
    """Owns the only writing connection of the process. Thread-safe to submit to.

    A job awaited through :meth:`run` whose caller is cancelled before the job started is not run
    (its future is cancelled); once started, it runs and commits regardless.
    """

    def __init__(self, path: Path, *, synchronous: str = "FULL", batch_max: int = 256) -> None:
        self.path = path
        self._synchronous = synchronous
        self._batch_max = batch_max
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._closed = threading.Event()
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
        return self._thread is not None and self._thread.is_alive() and not self._closed.is_set()

    def submit(self, job: Callable[[sqlite_utils.Database], T]) -> Future[T]:
        if not self.alive:
            raise StorageError("the database writer is not running")
        fut: Future[T] = Future()
        self._queue.put((job, fut))
        if self._closed.is_set():  # the thread ended between the check and the put: never leave it hanging
            self._fail_pending()
        return fut

    def run_sync(self, job: Callable[[sqlite_utils.Database], T]) -> T:
        """Run a job and wait for its commit (for CLI commands and start-up)."""
        return self.submit(job).result()

    async def run(self, job: Callable[[sqlite_utils.Database], T]) -> T:
        """Run a job and await its commit without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(job))

    def _fail_pending(self) -> None:
        err = StorageError("the database writer stopped before this write ran; nothing of it was stored")
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not _STOP and item[1].set_running_or_notify_cancel():
                item[1].set_exception(err)

    def _run(self) -> None:
        try:
            conn = connect_writer(self.path, self._synchronous)
            db = sqlite_utils.Database(conn)
        except BaseException as exc:  # reported to start()
            self._start_error = exc
            self._closed.set()
            self._ready.set()
            return
        self._ready.set()
        batch: list[tuple[Job, Future[Any]]] = []
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
                batch = []
                if stop_after:
                    break
        except BaseException as exc:
            # a bug in the writer itself: fail loudly, never leave a caller waiting forever
            log.critical("db_writer_died", error=repr(exc), path=str(self.path))
            err = StorageError(f"{self.path}: the database writer failed ({exc!r}); this write was not stored")
            for _, fut in batch:
                if not fut.done() and (fut.running() or fut.set_running_or_notify_cancel()):
                    fut.set_exception(err)
            raise
        finally:
            self._closed.set()
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            finally:
                conn.close()
                self._fail_pending()

    def _commit(self, conn: sqlite3.Connection, db: sqlite_utils.Database,
                batch: list[tuple[Job, Future[Any]]]) -> None:
        live = [(job, fut) for job, fut in batch if fut.set_running_or_notify_cancel()]
        if not live:
            return
        outcomes: list[tuple[Future[Any], bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for i, (job, fut) in enumerate(live):
                conn.execute(f"SAVEPOINT job{i}")
                try:
                    result = job(db)
                except Exception as exc:
                    if not conn.in_transaction:
                        # the error took the whole transaction with it (e.g. disk full, RAISE(ROLLBACK))
                        raise _BatchLost(f"{type(exc).__name__}: {exc}") from exc
                    conn.execute(f"ROLLBACK TO job{i}")
                    conn.execute(f"RELEASE job{i}")
                    outcomes.append((fut, False, exc))
                    continue
                if not conn.in_transaction:
                    log.error("db_job_ended_transaction", job=getattr(job, "__qualname__", repr(job)))
                    raise _BatchLost("a write job committed or rolled back the writer's transaction; "
                                     "jobs must use db.atomic() or savepoints, never COMMIT/ROLLBACK")
                conn.execute(f"RELEASE job{i}")
                outcomes.append((fut, True, result))
            conn.execute("COMMIT")
        except (sqlite3.Error, _BatchLost) as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.error("db_commit_failed", error=str(exc), jobs=len(live), path=str(self.path))
            err: StorageError
            if _disk_full(exc):
                err = StorageFull(f"{self.path}: the disk is full, nothing of this write was stored; free space "
                                  f"on {self.path.parent} (the agent resumes by itself)")
            else:
                err = StorageError(f"{self.path}: commit failed ({exc}); nothing of this write was stored")
            for _, fut in live:
                fut.set_exception(err)
            return
        self.commits += 1
        self.jobs += len(outcomes)
        for fut, ok, value in outcomes:
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)
