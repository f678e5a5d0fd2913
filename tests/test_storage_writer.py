"""The single writer: group commits, a failing job rolled back alone, results only after COMMIT."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils

from agent.errors import StorageError
from agent.storage import Store, Writer
from agent.storage.db import connect_reader


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Writer]:
    path = tmp_path / "w.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    conn.commit()
    conn.close()
    w = Writer(path, batch_max=64)
    w.start()
    try:
        yield w
    finally:
        w.stop()


def _insert(v: str) -> Any:
    def job(db: sqlite_utils.Database) -> int:
        return int(db.execute("INSERT INTO t (v) VALUES (?)", (v,)).lastrowid or 0)
    return job


def _blocked(w: Writer) -> tuple[threading.Event, Future[None]]:
    """Occupy the writer with one job until the event is set, so the next jobs queue up as one group."""
    release = threading.Event()
    started = threading.Event()

    def block(db: sqlite_utils.Database) -> None:
        started.set()
        assert release.wait(30)

    fut = w.submit(block)
    assert started.wait(30)
    return release, fut


def _values(path: Path) -> list[str]:
    conn = connect_reader(path)
    try:
        return [str(r[0]) for r in conn.execute("SELECT v FROM t ORDER BY id")]
    finally:
        conn.close()


def test_queued_jobs_are_grouped_into_few_commits(writer: Writer) -> None:
    release, blocker = _blocked(writer)
    commits_before = writer.commits
    futures = [writer.submit(_insert(f"v{i}")) for i in range(300)]
    release.set()
    blocker.result(30)
    ids = [f.result(30) for f in futures]
    assert len(set(ids)) == 300
    # 300 queued jobs, at most 64 per commit: 5 commits (+1 for the blocker), never one per job
    assert writer.commits - commits_before <= 1 + 5
    assert _values(writer.path) == [f"v{i}" for i in range(300)]


def test_a_failing_job_is_rolled_back_alone(writer: Writer) -> None:
    def bad(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO t (v) VALUES ('bad')")
        raise ValueError("bad input")

    def bad_sql(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO t (v) VALUES ('half')")
        db.execute("INSERT INTO t (v) VALUES (NULL)")  # NOT NULL constraint

    release, blocker = _blocked(writer)
    commits_before = writer.commits
    futs = [writer.submit(_insert("a")), writer.submit(bad), writer.submit(_insert("b")),
            writer.submit(bad_sql), writer.submit(_insert("c"))]
    release.set()
    blocker.result(30)
    assert futs[0].result(30) and futs[2].result(30) and futs[4].result(30)
    with pytest.raises(ValueError, match="bad input"):
        futs[1].result(30)
    with pytest.raises(sqlite3.IntegrityError):
        futs[3].result(30)
    assert _values(writer.path) == ["a", "b", "c"]
    assert writer.commits - commits_before <= 2  # the blocker's batch + this one


def test_results_are_delivered_only_after_commit(writer: Writer) -> None:
    seen: list[bool] = []

    def check_visible(fut: Future[int]) -> None:
        # runs the moment the result is set: another connection must already see the row
        conn = connect_reader(writer.path)
        try:
            row = conn.execute("SELECT 1 FROM t WHERE id = ?", (fut.result(),)).fetchone()
        finally:
            conn.close()
        seen.append(row is not None)

    release, _blocker = _blocked(writer)
    futures = [writer.submit(_insert(f"x{i}")) for i in range(50)]
    for f in futures:
        f.add_done_callback(check_visible)
    release.set()
    for f in futures:
        f.result(30)
    writer.run_sync(lambda db: None)  # callbacks run on the writer thread before its next batch
    assert seen == [True] * 50


def test_a_job_that_ends_the_transaction_fails_its_batch_loudly(writer: Writer) -> None:
    def commits_itself(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO t (v) VALUES ('sneaky')")
        db.conn.execute("COMMIT")

    release, blocker = _blocked(writer)
    futs = [writer.submit(_insert("before")), writer.submit(commits_itself)]
    release.set()
    blocker.result(30)
    for f in futs:
        with pytest.raises(StorageError, match="committed or rolled back"):
            f.result(30)
    # the writer keeps working afterwards
    assert writer.run_sync(_insert("after")) > 0


def test_an_error_that_destroys_the_transaction_fails_the_whole_batch(writer: Writer) -> None:
    conn = sqlite3.connect(writer.path)
    conn.execute("CREATE TRIGGER boom BEFORE INSERT ON t WHEN NEW.v = 'boom' "
                 "BEGIN SELECT RAISE(ROLLBACK, 'boom refused'); END")
    conn.commit()
    conn.close()
    release, blocker = _blocked(writer)
    futs = [writer.submit(_insert("ok1")), writer.submit(_insert("boom")), writer.submit(_insert("ok2"))]
    release.set()
    blocker.result(30)
    for f in futs:
        with pytest.raises(StorageError, match="nothing of this write was stored"):
            f.result(30)
    assert "ok1" not in _values(writer.path)
    assert writer.run_sync(_insert("later")) > 0


def test_stop_finishes_queued_jobs_and_refuses_new_ones(writer: Writer) -> None:
    release, _blocker = _blocked(writer)
    futures = [writer.submit(_insert(f"q{i}")) for i in range(20)]
    release.set()
    writer.stop()
    assert all(f.result(0) for f in futures)
    with pytest.raises(StorageError, match="not running"):
        writer.submit(_insert("late"))


def test_store_records_errors_bounded(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "s")
    try:
        for i in range(3):
            store.record_error_sync("test", "code_x", f"message {i}")
        conn = store.reader()
        rows = conn.execute("SELECT message FROM errors ORDER BY id").fetchall()
        conn.close()
    finally:
        store.close()
    assert [r[0] for r in rows] == ["message 0", "message 1", "message 2"]
