"""Forward migrations keep data; a newer database is refused; a failed step changes nothing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.errors import StorageError
from agent.storage import Store
from agent.storage.db import connect_writer
from agent.storage.migrations import COMPONENTS, applied_versions, migrate
from agent.storage.schema import core
from agent_devkit.procs import agent_process, status_json


def _old_database(state: Path) -> Path:
    """A state dir as the first release left it: core schema v1 only, with data in it."""
    state.mkdir(parents=True)
    path = state / "agent.db"
    conn = connect_writer(path)
    try:
        migrate(conn, targets={name: (1 if name == "core" else 0) for name in COMPONENTS})
        conn.execute("INSERT INTO kv (key, value, updated_at) VALUES ('install_id', 'abc-123', 1.0)")
        conn.execute("INSERT INTO daemon (id, pid, version, started_at, heartbeat_at, heartbeat_interval_s,"
                     " state, status_text, stopped_at) VALUES (1, 4242, '0.0.1', 1.0, 2.0, 5.0, 'stopped', 'old', 2.0)")
    finally:
        conn.close()
    return path


def test_open_migrates_an_older_database_and_keeps_its_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _old_database(state)
    assert len(core.MIGRATIONS) > 1, "the test needs core migrations beyond v1"
    store = Store.open(state)
    try:
        conn = store.reader()
        try:
            versions = applied_versions(conn)
            kv = conn.execute("SELECT value FROM kv WHERE key = 'install_id'").fetchone()
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    finally:
        store.close()
    assert kv == ("abc-123",)
    assert versions == {name: len(scripts) for name, scripts in COMPONENTS.items() if scripts}
    assert {"errors", "links"} <= tables
    assert store.corrupt is None
    assert path.exists()


def test_the_daemon_upgrades_an_old_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _old_database(state)
    with agent_process(state) as agent:
        agent.wait_ready()
        code, report = status_json(state)
        assert code == 0, report
        assert report["agent"]["schema"]["core"] == len(core.MIGRATIONS)  # type: ignore[index]
        assert agent.stop() == 0


def test_a_database_from_a_newer_agent_is_refused_untouched(tmp_path: Path) -> None:
    state = tmp_path / "state"
    path = _old_database(state)
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES ('core', 99, 0)")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StorageError, match="newer agent"):
        Store.open(state)
    assert path.read_bytes() == before
    assert not (state / "corrupt").exists()
    # the daemon says so and exits non-zero; no READY
    with agent_process(state) as agent:
        code = agent.proc.wait(60)
        assert code == 1
        assert "newer agent" in agent.output()
        assert not any("READY=1" in m.split("\n") for m in agent.notify.messages)


def test_a_failing_migration_step_leaves_no_trace(tmp_path: Path) -> None:
    conn = connect_writer(tmp_path / "m.db")
    try:
        steps = {"x": ["CREATE TABLE a (v INTEGER);",
                       "CREATE TABLE b (v INTEGER); INSERT INTO missing_table VALUES (1);"]}
        with pytest.raises(StorageError, match="x v2 failed"):
            migrate(conn, steps)
        assert applied_versions(conn) == {"x": 1}
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "a" in names and "b" not in names
    finally:
        conn.close()
