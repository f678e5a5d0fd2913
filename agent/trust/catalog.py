"""Read-only queries over stored releases (no crypto, no wasmtime): cheap enough for ``status``.

The write side and the verification path live in ``agent.trust.releases``.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from agent.trust.predicate import ReleasePredicate, parse_predicate

GENERATION_KEY = "generation"
SEEN_GENERATION_KEY = "daemon_seen_generation"

_COLS = ("id, kind, name, version, sha256, size, state, signer_key_id, predicate, source, installed_at, "
         "activated_at, retired_at")


@dataclass(frozen=True)
class Release:
    id: int
    kind: str
    name: str
    version: int
    sha256: str
    size: int
    state: str
    signer_key_id: str
    predicate: ReleasePredicate
    source: str
    installed_at: float
    activated_at: float | None
    retired_at: float | None

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Release:
        (rid, kind, name, version, sha, size, state, signer, pred, source, inst, act, ret) = row
        return cls(id=int(rid), kind=kind, name=name, version=int(version), sha256=sha, size=int(size), state=state,
                   signer_key_id=signer, predicate=parse_predicate(json.loads(pred)), source=source,
                   installed_at=float(inst), activated_at=act, retired_at=ret)


# ----------------------------------------------------------------------------------------- reads

def generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM trust_state WHERE key = ?", (GENERATION_KEY,)).fetchone()
    return int(row[0]) if row else 0


def floors(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    return {(str(k), str(n)): int(v) for k, n, v in conn.execute("SELECT kind, name, version FROM release_floors")}


def floor_of(conn: sqlite3.Connection, kind: str, name: str) -> int | None:
    row = conn.execute("SELECT version FROM release_floors WHERE kind = ? AND name = ?", (kind, name)).fetchone()
    return None if row is None else int(row[0])


def list_releases(conn: sqlite3.Connection, include_retired: bool = False) -> list[Release]:
    where = "" if include_retired else "WHERE state != 'retired'"
    rows = conn.execute(f"SELECT {_COLS} FROM releases {where} ORDER BY kind, name, version DESC").fetchall()
    return [Release.from_row(r) for r in rows]


def get_release(conn: sqlite3.Connection, release_id: int) -> Release | None:
    row = conn.execute(f"SELECT {_COLS} FROM releases WHERE id = ?", (release_id,)).fetchone()
    return None if row is None else Release.from_row(row)


def previous_release(conn: sqlite3.Connection, kind: str, name: str) -> Release | None:
    """The release a rollback of ``kind``/``name`` would re-activate."""
    row = conn.execute(f"SELECT {_COLS} FROM releases WHERE kind = ? AND name = ? AND state = 'previous'",
                       (kind, name)).fetchone()
    return None if row is None else Release.from_row(row)


def active_release(conn: sqlite3.Connection, kind: str, name: str) -> Release | None:
    row = conn.execute(f"SELECT {_COLS} FROM releases WHERE kind = ? AND name = ? AND state = 'active'",
                       (kind, name)).fetchone()
    return None if row is None else Release.from_row(row)
