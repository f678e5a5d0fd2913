"""Persisted health windows (``fleet_watches``): the schema upgrade, the start-up check (counting
starts, crash-loop rollback, closing what is no longer active) and a resumed window that judges a bad
release — real SQLite files, really-signed releases, real OPA-ABI policies, real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig, PolicySettings
from agent.daemon.releases import release_store
from agent.daemon.status import collect
from agent.fleet import watches
from agent.fleet.watches import all_watches, check_at_start, open_watches
from agent.policy.errors import PolicyEvalError
from agent.policy.registry import PolicyRegistry
from agent.policy.runtime import PolicyRuntime
from agent.storage import Store
from agent.storage.db import connect_writer
from agent.storage.migrations import COMPONENTS, applied_versions, migrate
from agent.storage.schema import fleet as fleet_schema
from agent.trust.releases import Release
from agent_devkit.fleet import (
    NAME,
    FleetWorld,
    async_test,
    custom_section,
    fleet_world,
    manager,
    running,
    sandbox_wasm,
)
from agent_devkit.releases import Signer, wasm_module

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------ schema

def test_fleet_schema_v1_database_upgrades_in_place_and_keeps_its_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    conn = connect_writer(state / "agent.db")
    try:  # what the previous agent left: every component at its latest, fleet at v1, with data
        migrate(conn, targets={"fleet": 1})
        conn.execute("INSERT INTO fleet_releases (kind, name, version, sha256, scope, state, received_at, updated_at)"
                     " VALUES ('policy', 'gate', 7, 'ab', 'all', 'active', 1.0, 2.0)")
        conn.execute("INSERT INTO fleet_status (kind, name, version, state, payload, updated_at) "
                     "VALUES ('policy', 'gate', 7, 'active', '{}', 2.0)")
        assert applied_versions(conn)["fleet"] == 1
        assert "fleet_watches" not in {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    finally:
        conn.close()
    store = Store.open(state)
    try:
        reader = store.reader()
        try:
            assert applied_versions(reader)["fleet"] == len(fleet_schema.MIGRATIONS) >= 2
            assert reader.execute("SELECT kind, name, version, state FROM fleet_releases").fetchall() == \
                [("policy", "gate", 7, "active")]
            assert reader.execute("SELECT version, state FROM fleet_status").fetchall() == [(7, "active")]
            assert open_watches(reader) == []
        finally:
            reader.close()
        # the new table works, and allows at most one open window per kind/name
        open_job = watches.open_job("policy", "gate", 8, "cd", previous_version=7, scope="all", shadow=None,
                                    window_s=30.0)
        first = store.writer.run_sync(open_job)
        second = store.writer.run_sync(open_job)  # a newer activation closes the older open window
        store.writer.run_sync(watches.close_job(second, "healthy"))
        with pytest.raises(sqlite3.IntegrityError):
            store.writer.run_sync(lambda db: [db.execute(
                "INSERT INTO fleet_watches (kind, name, version, sha256, window_s, opened_at, window_started_at) "
                "VALUES ('policy', 'gate', 9, 'x', 1, 0, 0)") for _ in range(2)])
        reader = store.reader()
        try:
            states = {w.id: w.state for w in all_watches(reader)}
        finally:
            reader.close()
        assert states == {first: "superseded", second: "healthy"}
    finally:
        store.close()
    assert set(COMPONENTS) >= {"fleet"}


# ------------------------------------------------------------------------------- start-up check

class Line:
    """A state dir with policy ``gate`` v1 active and v2 activated through a recorded health window."""

    def __init__(self, tmp: Path) -> None:
        self.signer = Signer.create()
        self.state = tmp / "state"
        self.signer.trust(self.state, kinds=("policy",))
        self.store = Store.open(self.state)
        self.releases = release_store(self.store)
        self.wasm = sandbox_wasm()

    def artifact(self, version: int) -> bytes:
        return custom_section(self.wasm, "v", str(version).encode())

    def install(self, version: int) -> Release:
        art = self.artifact(version)
        return self.releases.install(art, self.signer.sign(art, "policy", NAME, version, entrypoints=["ok/echo"]))

    def activate_watched(self, version: int, window_s: float = 30.0) -> int:
        """What the orchestrator does: stage, open the window, activate."""
        art = self.artifact(version)
        rel = self.releases.stage(art, self.signer.sign(art, "policy", NAME, version, entrypoints=["ok/echo"]))
        active = self.releases.active("policy", NAME)
        watch_id = self.store.writer.run_sync(watches.open_job(
            "policy", NAME, version, rel.sha256, previous_version=active.version if active else None,
            scope="site/p1", shadow={"evaluated": 3, "changed": 1, "errors": 0}, window_s=window_s))
        self.releases.activate(rel.id)
        return int(watch_id)

    def check(self, max_starts: int = 2) -> list[watches.Watch]:
        return check_at_start(self.releases, node_id="gw-1", window_s=5.0, max_starts=max_starts)

    def rows(self) -> list[watches.Watch]:
        conn = self.store.reader()
        try:
            return all_watches(conn)
        finally:
            conn.close()

    def status(self) -> dict[str, Any]:
        conn = self.store.reader()
        try:
            row = conn.execute("SELECT payload FROM fleet_status WHERE kind = 'policy' AND name = ?",
                               (NAME,)).fetchone()
            release = conn.execute("SELECT state, code FROM fleet_releases WHERE version = 2").fetchone()
        finally:
            conn.close()
        return {**json.loads(row[0]), "fleet_releases": tuple(release)}


@pytest.fixture
def line(tmp_path: Path) -> Any:
    ln = Line(tmp_path)
    try:
        yield ln
    finally:
        ln.store.close()


def test_each_start_counts_and_the_start_after_the_limit_rolls_back(line: Line) -> None:
    line.install(1)
    watch_id = line.activate_watched(2)
    for start in (1, 2):  # within the limit: resumed, window from the start again
        resumed = line.check(max_starts=2)
        assert [(w.id, w.version, w.previous_version, w.starts, w.window_s) for w in resumed] == \
            [(watch_id, 2, 1, start, 5.0)]
        assert resumed[0].left_s() > 4.0
        report = collect(AgentConfig().with_state_dir(line.state))
        (probation,) = report["fleet_watches"]
        assert (probation["version"], probation["replaced"], probation["starts"]) == (2, 1, start)
        assert "runs again at its next start" in probation["left"]  # no daemon holds this state dir
        active = line.releases.active("policy", NAME)
        assert active is not None and active.version == 2
    assert line.check(max_starts=2) == []  # the third start: rolled back before anything loads v2
    active = line.releases.active("policy", NAME)
    assert active is not None and active.version == 1
    assert line.releases.floor("policy", NAME) == 2  # the floor is not lowered: v2 cannot come back
    (watch,) = line.rows()
    assert (watch.state, watch.code, watch.starts) == ("rolled_back", "crash_loop", 3)
    assert watch.message == "the agent restarted 3 time(s) within the health window of gate v2; rolled back to v1"
    st = line.status()  # stored as the line's status (published when the link comes up)
    assert (st["state"], st["code"], st["version"], st["active_version"], st["scope"]) == \
        ("rolled_back", "crash_loop", 2, 1, "site/p1")
    assert st["message"] == watch.message and st["shadow"] == {"evaluated": 3, "changed": 1, "errors": 0}
    assert st["fleet_releases"] == ("rolled_back", "crash_loop")  # a redelivery is recognised as handled
    assert line.check(max_starts=2) == []  # a closed window is never resumed
    assert line.rows()[0].starts == 3


def test_a_crash_loop_without_a_previous_release_is_kept_and_said_so(line: Line) -> None:
    line.activate_watched(1)
    assert line.check(max_starts=0) == []
    active = line.releases.active("policy", NAME)
    assert active is not None and active.version == 1
    (watch,) = line.rows()
    assert (watch.state, watch.code) == ("kept", "crash_loop")
    assert "nothing to roll back to" in watch.message
    report = collect(AgentConfig().with_state_dir(line.state))  # the technician's view
    assert any("gate v1 is unhealthy and still runs: crash_loop" in p for p in report["problems"])
    assert report["fleet_watches"] == []


def test_a_window_whose_release_is_no_longer_active_is_closed_without_action(line: Line) -> None:
    line.install(1)
    line.activate_watched(2)
    line.install(3)  # `edge-agent install` of a newer one by hand while the daemon was down
    assert line.check(max_starts=0) == []
    active = line.releases.active("policy", NAME)
    assert active is not None and active.version == 3  # nothing rolled back
    (watch,) = line.rows()
    assert watch.state == "superseded" and "v3" in watch.message
    # a window opened but whose activation never committed (crash in between) is closed the same way
    art = line.artifact(4)
    rel = line.releases.stage(art, line.signer.sign(art, "policy", NAME, 4, entrypoints=["ok/echo"]))
    line.store.writer.run_sync(watches.open_job("policy", NAME, 4, rel.sha256, previous_version=3, scope="all",
                                                shadow=None, window_s=1.0))
    assert line.check(max_starts=5) == []
    assert [w.state for w in line.rows()] == ["superseded", "superseded"]


# ----------------------------------------------- a resumed window judges (in-process restart, Mosquitto)

@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


@async_test
async def test_a_resumed_window_rolls_back_a_release_that_turns_out_bad(world: FleetWorld) -> None:
    """v2 traps only under load; the gateway stops (window open) before any load; after the restart the
    window runs again on what the loader loaded, sees the traps, and rolls back to v1."""
    gw = world.gateway("gw-r", health_window_s=30.0)
    wasm = sandbox_wasm()
    async with manager(world) as mgr:
        await gw.start()
        try:
            await mgr.push("all", wasm, world.sign(wasm, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
            await mgr.wait_state("gw-r", 1, "active")
            await mgr.wait_for(lambda: bool(open_watches_of(gw.store)) and open_watches_of(gw.store)[0].version == 1)
            bad = custom_section(wasm, "v", b"2")
            await mgr.push("all", bad, world.sign(bad, 2, entrypoints=["bad/trap"]), "policy", NAME, 2)
            await mgr.wait_state("gw-r", 2, "active")
            await mgr.wait_for(lambda: [w.version for w in open_watches_of(gw.store)] == [2])
        finally:
            await gw.stop()  # the process ends with v2's window open
        # the restart: fresh memory, same state; the policy loader loads the active release (v2)
        gw.policies = PolicyRegistry()
        gw.renew()
        resumed = await asyncio.to_thread(gw.agent.check_watches)
        assert [(w.version, w.starts) for w in resumed] == [(2, 1)]
        active = gw.releases.active("policy", NAME)
        assert active is not None and active.version == 2
        art = gw.releases.artifact_bytes(active.sha256)
        # what the policy loader does at start: the one load path, default entrypoint from the predicate
        policy = await PolicyRuntime(gw.store, PolicySettings(), registry=gw.policies).load_release(active, art)
        assert policy.default_entrypoint == "bad/trap"
        task = asyncio.create_task(gw.agent.run())
        try:
            failures = 0
            async with asyncio.timeout(30):
                while gw.releases.active("policy", NAME).version == 2:  # type: ignore[union-attr]
                    current = gw.policies.get(NAME)
                    if current is not None and current.version == 2:
                        try:
                            current.evaluate({"i": failures})
                        except PolicyEvalError:
                            failures += 1
                    await asyncio.sleep(0.01)
            st = await mgr.wait_state("gw-r", 2, "rolled_back")
            # the status is published before the watch is closed: wait for that too before stopping
            await mgr.wait_for(lambda: not open_watches_of(gw.store))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            gw.store.close()
    assert failures >= 1 and st["code"] == "health_traps" and st["active_version"] == 1
    current = gw.policies.get(NAME)
    assert current is not None and current.version == 1
    rows = all_watches_of(gw.state_dir)
    assert [(w.version, w.state, w.starts) for w in rows] == [(1, "cut", 0), (2, "rolled_back", 1)]


def open_watches_of(store: Store) -> list[watches.Watch]:
    conn = store.reader()
    try:
        return open_watches(conn)
    finally:
        conn.close()


def all_watches_of(state_dir: Path) -> list[watches.Watch]:
    conn = sqlite3.connect(f"file:{state_dir / 'agent.db'}?mode=ro", uri=True)
    try:
        return all_watches(conn)
    finally:
        conn.close()


# ------------------------------------------------------------------------- an unreadable database

@contextlib.contextmanager
def database_gone(state: Path) -> Iterator[None]:
    """The state database vanishes from its directory (a failing disk, an operator's mistake): every new
    reader fails, while the open writer keeps its file. It comes back on exit."""
    db, away = state / "agent.db", state / "agent.db.away"
    db.rename(away)
    try:
        yield
    finally:
        away.rename(db)


@async_test
async def test_a_health_window_whose_numbers_cannot_be_read_is_never_closed_healthy(world: FleetWorld) -> None:
    """A health sample read from a database that fails is not an empty sample: the window keeps watching
    past its end until the numbers can be read again, and only then is the release judged."""
    gw = world.gateway("gw-dbfail", modules=True, health_window_s=0.5)
    blob = wasm_module()
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", blob, world.signer.sign(blob, "module", "m", 1), "module", "m", 1)
        await mgr.wait_state("gw-dbfail", 1, "active", kind="module", name="m")
        with database_gone(gw.state_dir):
            await asyncio.sleep(2.0)  # four times the window
            assert gw.agent.swap.counters.healthy == 0
            assert not [s for t, s in mgr.history if s.get("state") == "rolled_back"]
        await mgr.wait_for(lambda: gw.agent.swap.counters.healthy == 1, 30)
    rows = all_watches_of(gw.state_dir)
    assert [(w.kind, w.version, w.state) for w in rows] == [("module", 1, "healthy")]


@async_test
async def test_the_fleet_side_does_not_start_on_a_memory_it_cannot_read(world: FleetWorld) -> None:
    """What the gateway settled (and the statuses to re-publish) is read before the link starts; while the
    database cannot be read the link waits, rather than starting with an empty memory that would
    re-install every retained release as new."""
    gw = world.gateway("gw-nomem")
    with database_gone(gw.state_dir):
        task = asyncio.create_task(gw.agent.run())
        try:
            await asyncio.sleep(1.5)
            assert not gw.agent.link.connected.is_set() and not task.done()
        except BaseException:
            task.cancel()
            raise
    try:
        await asyncio.wait_for(gw.agent.link.connected.wait(), 30)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        gw.store.close()
