"""A really full disk (a small tmpfs): writes fail with StorageFull, the outbox service keeps going,
and everything resumes once space is freed. Needs permission to mount a tmpfs (root); skipped otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlite_utils

from agent.config.sync import OutboxSettings
from agent.errors import StorageFull
from agent.storage import Store
from agent.sync.outbox import Outbox
from agent.sync.service import OutboxService
from agent_devkit.localbus import persistent_broker, publish_counted
from agent_devkit.procs import agent_process, status_json
from tests.test_ingest_faults import query, wait_until


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _grow(mnt: Path) -> None:
    subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)


def _junk(n: int) -> object:
    def job(db: sqlite_utils.Database) -> None:
        db.conn.executemany("INSERT INTO kv (key, value, updated_at) VALUES (?, ?, 0)",
                            [(f"junk/{n}/{i}", "x" * 4000) for i in range(20)])
    return job


def _fill(store: Store) -> StorageFull:
    for n in range(2000):  # 80 kB per job: a 3 MiB disk is full long before
        try:
            store.writer.run_sync(_junk(n))  # type: ignore[arg-type]
        except StorageFull as exc:
            return exc
    raise AssertionError("the disk never filled")


def test_a_full_disk_is_reported_as_such_and_writes_resume_after_space_is_freed(small_disk: Path) -> None:
    store = Store.open(small_disk / "state")
    try:
        full = _fill(store)
        assert full.code == "storage_full" and "the disk is full" in str(full) and "free space on" in str(full)
        with pytest.raises(StorageFull):
            store.writer.run_sync(_junk(10_000))  # type: ignore[arg-type]
        _grow(small_disk)
        store.writer.run_sync(_junk(10_001))  # type: ignore[arg-type]
    finally:
        store.close()


def test_the_outbox_service_rides_out_a_full_disk(small_disk: Path) -> None:
    """It used to die on the first failed commit, taking the daemon down (and the service manager gives
    up after a few restarts): now it logs, backs off and carries on when space is back."""
    store = Store.open(small_disk / "state")

    async def scenario() -> None:
        settings = OutboxSettings(maintenance_interval_s=0.2)
        service = OutboxService(store, settings, Outbox(store.writer, settings))
        _fill(store)
        task = asyncio.create_task(service.run())
        try:
            await asyncio.sleep(2.5)  # several failing ticks
            assert not task.done(), task.exception() if task.done() else None
            _grow(small_disk)
            await asyncio.sleep(3)  # the backoff passes, the next tick writes again
            assert not task.done()
            n = await store.writer.run(lambda db: db.conn.execute("SELECT count(*) FROM kv").fetchone()[0])
            assert n > 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(scenario())
    finally:
        store.close()


def test_the_daemon_rides_out_a_full_disk_and_loses_nothing(small_disk: Path, tmp_path: Path) -> None:
    """The real daemon, its state on a small disk that another program fills: it stays up, says why,
    acknowledges nothing it cannot store, and once space is freed stores everything the broker kept."""
    with persistent_broker(tmp_path / "mq") as broker:
        config = tmp_path / "agent.toml"
        config.write_text(f"""
[agent]
node_id = "full-disk"
heartbeat_interval_s = 0.5
[local_broker]
host = "{broker.host}"
port = {broker.port}
reconnect_min_s = 0.1
reconnect_max_s = 0.5
""")
        db = small_disk / "agent.db"
        with agent_process(small_disk, config) as agent:  # the log stays outside the small disk
            agent.wait_ready()
            wait_until(lambda: query(db, "SELECT state FROM links WHERE name = 'local_broker'") == [("up",)], 20,
                       "the local bus to connect", agent)
            hog = small_disk / "hog"
            with hog.open("wb") as f, contextlib.suppress(OSError):  # another program fills the disk
                while True:
                    f.write(b"\0" * 65536)
            items = [(f"factory/l1/s{i % 4}/temp", json.dumps({"value": i, "seq": i}).encode()) for i in range(300)]
            acked = asyncio.run(publish_counted(broker.host, broker.port, items, client_id="full-pub"))
            time.sleep(3)
            assert agent.proc.poll() is None, agent.output()[-3000:]
            assert query(db, "SELECT count(*) FROM readings") == [(0,)]  # nothing stored, so nothing acked
            _code, report = status_json(small_disk, config)
            assert any("the state disk is full" in p or "MiB free on the state disk" in p
                       for p in report["problems"]), report  # type: ignore[attr-defined]
            hog.unlink()  # the technician frees space
            wait_until(lambda: {r[0] for r in query(db, "SELECT json_extract(payload, '$.seq') FROM readings")}
                       >= set(acked), 60, "every acknowledged reading stored once space was freed", agent)
            assert agent.proc.poll() is None
            assert agent.stop() == 0
        assert len(acked) == 300

