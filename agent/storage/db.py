"""Opening the state database: pragmas, integrity check, quarantine of corrupt files.

One database file per agent (``<state_dir>/agent.db``), WAL mode. The daemon writes through
exactly one connection (see ``writer.py``); every reader opens its own connection.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from agent.errors import DatabaseCorrupt, StorageError
from agent.logs import get_logger

log = get_logger("storage")

BUSY_TIMEOUT_MS = 5000


def connect_writer(path: Path, synchronous: str = "FULL") -> sqlite3.Connection:
    """The connection the single writer owns. ``isolation_level=None``: we issue BEGIN ourselves."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=True)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise StorageError(f"{path}: could not switch the database to WAL mode (got {mode})")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def connect_reader(path: Path, *, stale_ok: bool = True) -> sqlite3.Connection:
    """A read-only connection: never creates, never writes, never blocks the writer.

    Falls back to ``immutable=1`` when the WAL side files cannot be opened (for example a
    technician without write access to the state dir): the view may then miss the newest commits.
    ``stale_ok=False`` refuses that fallback (the error is raised): for readers that judge something
    from the newest rows, where an old view would be a wrong answer rather than a partial one.
    """
    if not path.exists():
        raise StorageError(f"{path}: no state database (the agent has never run with this state dir)")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn
    except sqlite3.OperationalError:
        if not stale_ok:
            raise
        conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return conn


# SQLite result codes that mean "this file is damaged" (as opposed to busy, locked, I/O, permissions)
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def check_integrity(path: Path) -> str | None:
    """``None`` if the file is a healthy database (or absent), else the damage found.

    Only real damage counts: a busy, locked or unreadable file raises :class:`StorageError` instead, so a
    healthy database is never moved aside because someone else held a lock at that moment.
    """
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(str(path), isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return str(exc)
        raise StorageError(f"{path}: cannot check the database ({exc}); it was left untouched") from exc
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    return "; ".join(problems[:5]) if problems else None


def quarantine(path: Path, problem: str) -> Path:
    """Move a corrupt database (and its WAL side files) aside; never delete it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest_dir = path.parent / "corrupt"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{path.name}.{stamp}"
    n = 0
    while dest.exists():
        n += 1
        dest = dest_dir / f"{path.name}.{stamp}.{n}"
    for suffix in ("", "-wal", "-shm"):
        src = Path(str(path) + suffix)
        if src.exists():
            src.rename(Path(str(dest) + suffix))
    log.error("database_quarantined", path=str(path), moved_to=str(dest), problem=problem)
    return dest


def open_checked(path: Path) -> DatabaseCorrupt | None:
    """Integrity-check ``path`` at start; move a corrupt file aside and return what happened.

    Only the process that holds the state-dir lock (the daemon) may call this: moving the file
    away from under a running daemon would split its state in two.
    """
    problem = check_integrity(path)
    if problem is None:
        return None
    dest = quarantine(path, problem)
    return DatabaseCorrupt(
        f"{path}: the database failed its integrity check ({problem}); it was moved to {dest} "
        "and a fresh database was created. Keep the moved file for analysis.")


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    """Readers of an older or half-migrated database must not trip over a missing table."""
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None
