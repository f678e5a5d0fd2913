"""Persisted health windows ("watches"): a fresh release stays on probation across restarts and crashes.

Why: the health window used to live only in memory, so a release activated just before a stop (or a
crash) silently counted as good after the restart, and a release that kills the agent put the gateway
into a crash loop that nothing rolled back. Now the orchestrator records an ``open`` watch before it
activates a release (kind, name, version, the version it replaced, when, how many agent starts
happened during it) and closes it with the outcome (``healthy``, ``rolled_back``, …).

At every daemon start, :func:`check_at_start` runs **before any service task exists** (so before the
policy loader or the module service can load anything): each open watch counts one more start if
the previous run died or failed (a clean stop does not count); a watch whose release is no longer
active is closed without action; one that saw more than ``max_starts_in_health_window`` starts is
rolled back right there (``crash_loop``) and its status is recorded (published once the link is up);
the others run their full window again in the daemon.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from agent.errors import AgentError
from agent.fleet.reporter import ReleaseStatus, record_job
from agent.logs import get_logger
from agent.storage.db import table_exists
from agent.trust.releases import ReleaseStore, ReleaseStoreError

log = get_logger("fleet")

OPEN = "open"
# healthy: the window ended without a rule crossed; rolled_back: by a rule or a crash loop;
# cut: ended early for a newer release; superseded: the release was no longer active (e.g. a newer one
# installed by hand); kept: unhealthy but there was nothing to roll back to
CLOSED = ("healthy", "rolled_back", "cut", "superseded", "kept")
HISTORY_KEPT = 50  # closed watches kept (audit trail); open ones are never trimmed
CRASH_LOOP = "crash_loop"

_COLS = ("id, kind, name, version, sha256, previous_version, scope, shadow, window_s, opened_at, "
         "window_started_at, starts, state, code, message, closed_at")


@dataclass(frozen=True)
class Watch:
    id: int
    kind: str
    name: str
    version: int
    sha256: str
    previous_version: int | None
    scope: str
    shadow: dict[str, int] | None
    window_s: float
    opened_at: float
    window_started_at: float
    starts: int
    state: str
    code: str = ""
    message: str = ""
    closed_at: float | None = None

    @classmethod
    def of(cls, row: tuple[Any, ...]) -> Watch:
        try:
            shadow = json.loads(row[7]) if row[7] else None
        except json.JSONDecodeError:
            shadow = None
        return cls(int(row[0]), str(row[1]), str(row[2]), int(row[3]), str(row[4]),
                   None if row[5] is None else int(row[5]), str(row[6]),
                   shadow if isinstance(shadow, dict) else None, float(row[8]), float(row[9]), float(row[10]),
                   int(row[11]), str(row[12]), str(row[13]), str(row[14]), None if row[15] is None else float(row[15]))

    def left_s(self, now: float | None = None) -> float:
        """Seconds left of the current run of the window (0 when it is overdue: the daemon is down)."""
        return max(0.0, self.window_s - ((time.time() if now is None else now) - self.window_started_at))


def _close(db: sqlite_utils.Database, watch_id: int, state: str, code: str, message: str) -> None:
    assert state in CLOSED, state
    db.execute("UPDATE fleet_watches SET state = ?, code = ?, message = ?, closed_at = ? WHERE id = ? "
               "AND state = 'open'", (state, code, message[:2000], time.time(), watch_id))
    db.execute("DELETE FROM fleet_watches WHERE state != 'open' AND id NOT IN (SELECT id FROM fleet_watches "
               "WHERE state != 'open' ORDER BY id DESC LIMIT ?)", (HISTORY_KEPT,))


def open_job(kind: str, name: str, version: int, sha256: str, *, previous_version: int | None, scope: str,
             shadow: dict[str, int] | None, window_s: float) -> Callable[[sqlite_utils.Database], int]:
    """Open the watch of a release about to be activated (an older open watch of kind/name is closed)."""
    def job(db: sqlite_utils.Database) -> int:
        for (old_id,) in db.execute("SELECT id FROM fleet_watches WHERE kind = ? AND name = ? AND state = 'open'",
                                    (kind, name)).fetchall():
            _close(db, int(old_id), "superseded", "", f"version {version} is being activated")
        now = time.time()
        cur = db.execute(
            "INSERT INTO fleet_watches (kind, name, version, sha256, previous_version, scope, shadow, window_s, "
            "opened_at, window_started_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (kind, name, version, sha256, previous_version, scope,
             json.dumps(shadow, sort_keys=True) if shadow else "", window_s, now, now))
        return int(cur.lastrowid or 0)
    return job


def discard_job(watch_id: int) -> Callable[[sqlite_utils.Database], None]:
    """Forget a watch whose release never became active (the activation failed)."""
    def job(db: sqlite_utils.Database) -> None:
        db.execute("DELETE FROM fleet_watches WHERE id = ? AND state = 'open'", (watch_id,))
    return job


def close_job(watch_id: int, state: str, *, code: str = "", message: str = "") -> Callable[[sqlite_utils.Database],
                                                                                              None]:
    def job(db: sqlite_utils.Database) -> None:
        _close(db, watch_id, state, code, message)
    return job


def restart_job(window_s: float, count: bool = True) -> Callable[[sqlite_utils.Database], list[Watch]]:
    """Each open window runs again in full from now; ``count``: this start follows a crash or a
    failure, so it counts toward the crash-loop limit (a clean stop and start does not)."""
    def job(db: sqlite_utils.Database) -> list[Watch]:
        if not table_exists(db.conn, "fleet_watches"):
            return []
        db.execute("UPDATE fleet_watches SET starts = starts + ?, window_started_at = ?, window_s = ? "
                   "WHERE state = 'open'", (1 if count else 0, time.time(), window_s))
        return [Watch.of(r) for r in db.execute(
            f"SELECT {_COLS} FROM fleet_watches WHERE state = 'open' ORDER BY id").fetchall()]
    return job


def open_watches(conn: sqlite3.Connection) -> list[Watch]:
    if not table_exists(conn, "fleet_watches"):
        return []
    return [Watch.of(r) for r in conn.execute(
        f"SELECT {_COLS} FROM fleet_watches WHERE state = 'open' ORDER BY kind, name").fetchall()]


def all_watches(conn: sqlite3.Connection) -> list[Watch]:
    """Every stored watch, oldest first (tests, audits)."""
    if not table_exists(conn, "fleet_watches"):
        return []
    return [Watch.of(r) for r in conn.execute(f"SELECT {_COLS} FROM fleet_watches ORDER BY id").fetchall()]


def crash_loop_message(watch: Watch, restored: int | None) -> str:
    back = f"rolled back to v{restored}" if restored is not None else "nothing to roll back to"
    return (f"the agent restarted {watch.starts} time(s) within the health window of {watch.name} "
            f"v{watch.version}; {back}")


def check_at_start(releases: ReleaseStore, *, node_id: str, window_s: float, max_starts: int,
                   after_failure: bool = True) -> list[Watch]:
    """Count this start in every open window, settle what must not run again; return the watches to resume.

    Blocking (writer jobs, readers): the daemon calls it while building its services, before any
    service task runs, so a crash-looping release is rolled back before anything loads it.
    """
    writer = releases.store.writer
    resumed: list[Watch] = []
    for watch in writer.run_sync(restart_job(window_s, count=after_failure)):
        active = releases.active(watch.kind, watch.name)
        if active is None or (active.version, active.sha256) != (watch.version, watch.sha256):
            now_runs = f"v{active.version}" if active is not None else "nothing"
            log.info("fleet_watch_closed", kind=watch.kind, release=watch.name, version=watch.version,
                     outcome="superseded", reason=f"no longer active ({now_runs} is)")
            writer.run_sync(close_job(watch.id, "superseded", message=f"no longer active at start ({now_runs} is)"))
            continue
        if watch.starts > max_starts:
            _crash_loop_rollback(releases, watch, node_id=node_id, max_starts=max_starts)
            continue
        log.info("fleet_watch_resumed", kind=watch.kind, release=watch.name, version=watch.version,
                 starts=watch.starts, max_starts=max_starts, window_s=window_s)
        resumed.append(watch)
    return resumed


def _crash_loop_rollback(releases: ReleaseStore, watch: Watch, *, node_id: str, max_starts: int) -> None:
    try:
        restored = releases.rollback(watch.kind, watch.name)
    except ReleaseStoreError as exc:  # the first release of its name: nothing to return to
        message = f"{crash_loop_message(watch, None)}: {exc}"
        log.error("fleet_crash_loop_no_previous", kind=watch.kind, release=watch.name, version=watch.version,
                  starts=watch.starts, max_starts=max_starts, error=str(exc))
        status = ReleaseStatus(node_id=node_id, kind=watch.kind, name=watch.name, version=watch.version,
                               state="active", sha256=watch.sha256, scope=watch.scope, code=CRASH_LOOP,
                               message=message, shadow=watch.shadow, active_version=watch.version)
        state = "kept"
    else:
        message = crash_loop_message(watch, restored.version)
        log.error("fleet_crash_loop_rollback", kind=watch.kind, release=watch.name, version=watch.version,
                  starts=watch.starts, max_starts=max_starts, restored=restored.version)
        status = ReleaseStatus(node_id=node_id, kind=watch.kind, name=watch.name, version=watch.version,
                               state="rolled_back", sha256=watch.sha256, scope=watch.scope, code=CRASH_LOOP,
                               message=message, shadow=watch.shadow, active_version=restored.version)
        state = "rolled_back"
    record = record_job(status, status.to_json().decode())
    close = close_job(watch.id, state, code=CRASH_LOOP, message=message)

    def job(db: sqlite_utils.Database) -> None:  # the status and the closed watch in one commit
        record(db)
        close(db)
    writer = releases.store.writer
    try:
        writer.run_sync(job)
    except AgentError as exc:  # the rollback itself stands; the next start finds the watch inactive
        log.error("fleet_watch_not_closed", kind=watch.kind, release=watch.name, version=watch.version,
                  error=str(exc))
