"""A corrupt database is moved aside (never deleted), reported, and a fresh one works."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DatabaseCorrupt, StorageError
from agent.storage import Store
from agent_devkit.procs import agent_process, status_json

GARBAGE = os.urandom(64) + b"this is not an SQLite database" * 300


def test_garbage_database_is_quarantined_and_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "agent.db").write_bytes(GARBAGE)

    # status on the corrupt file: unhealthy, exit 1, a message — not a traceback, and nothing moved
    code, report = status_json(state)
    assert code == 1
    assert any("cannot read the state database" in p for p in report["problems"])  # type: ignore[attr-defined]
    assert (state / "agent.db").read_bytes() == GARBAGE

    with agent_process(state, extra_env={"WATCHDOG_USEC": "1000000"}) as agent:
        agent.wait_ready()
        agent.notify.wait_for("WATCHDOG=1", timeout=30)  # the fresh database takes heartbeats
        moved = list((state / "corrupt").iterdir())
        assert [p.read_bytes() for p in moved] == [GARBAGE]
        assert moved[0].name.startswith("agent.db.")
        code, report = status_json(state)
        errors: Any = report["errors"]
        assert any(e["code"] == "database_corrupt" and str(moved[0]) in e["message"] for e in errors)
        assert report["daemon"]["state"] == "running"  # type: ignore[index]
        assert "database_quarantined" in agent.output()
        assert agent.stop() == 0
    # a second start finds a healthy database: nothing more is moved aside
    with agent_process(state) as agent:
        agent.wait_ready()
        assert agent.stop() == 0
    assert len(list((state / "corrupt").iterdir())) == 1


def test_a_damaged_page_is_detected_and_moved_aside_by_the_owner_only(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = Store.open(state)
    store.writer.run_sync(lambda db: db.conn.executemany(
        "INSERT INTO kv (key, value, updated_at) VALUES (?, ?, 0)", [(f"k{i}", "v" * 200) for i in range(2000)]))
    store.close()
    path = state / "agent.db"
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 20 * page
    data[10 * page: 12 * page] = os.urandom(2 * page)  # two b-tree pages of the kv table
    path.write_bytes(bytes(data))
    damaged = path.read_bytes()

    # a CLI command (not the lock holder) refuses and leaves the file where it is
    with pytest.raises(DatabaseCorrupt, match="restart the daemon"):
        Store.open(state)
    assert path.read_bytes() == damaged

    # the daemon's open moves it aside and starts fresh
    store = Store.open(state, owner=True)
    try:
        assert store.corrupt is not None
        moved = list((state / "corrupt").iterdir())
        assert [p.read_bytes() for p in moved] == [damaged]
        conn = store.reader()
        assert conn.execute("SELECT count(*) FROM kv").fetchone() == (0,)
        conn.close()
    finally:
        store.close()


def test_an_unopenable_database_is_an_error_not_corruption(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "agent.db").mkdir(parents=True)  # cannot be opened, but is not a damaged database either
    with pytest.raises(StorageError) as info:
        Store.open(state, owner=True)
    assert not isinstance(info.value, DatabaseCorrupt)
    assert (state / "agent.db").is_dir()
    assert not (state / "corrupt").exists()
