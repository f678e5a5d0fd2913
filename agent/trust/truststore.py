"""The gateway's trust store: which public keys may sign what (kinds, name globs), and root keys.

Two roles: ``release`` keys sign releases within their scope; ``root`` keys sign key-set updates
(``urn:edge-agent:keyset:v1``), which is how keys rotate and get revoked without touching the box.
:class:`TrustSet` is the immutable, in-memory view the pure verifier takes; the ``*_job`` functions
are writer jobs that change the persisted store.
"""

from __future__ import annotations

import fnmatch
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import sqlite_utils

from agent.trust.errors import TrustError
from agent.trust.keys import PublicKey, load_public_pem
from agent.trust.predicate import KINDS

Role = Literal["release", "root"]
ROLES: tuple[Role, ...] = ("release", "root")


@dataclass(frozen=True)
class TrustedKey:
    public: PublicKey
    kinds: tuple[str, ...] = ()  # empty = every kind
    names: str = "*"  # fnmatch glob over release names
    role: Role = "release"
    source: str = "local"  # "local" (trust add) or "keyset:<sequence>"
    added_at: float = 0.0
    comment: str = ""

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def allows(self, kind: str, name: str) -> bool:
        return (not self.kinds or kind in self.kinds) and fnmatch.fnmatchcase(name, self.names)

    @property
    def scope_text(self) -> str:
        return f"kinds={','.join(self.kinds) or '*'} names={self.names}"


@dataclass(frozen=True)
class TrustSet:
    """An immutable snapshot of trusted keys (what :func:`verify_release` checks against)."""

    keys: tuple[TrustedKey, ...] = ()

    def by_reference(self, ref: str) -> TrustedKey | None:
        """Find a key by hex id, id prefix (>= 8 chars) or base64 hint."""
        for k in self.keys:
            if ref in (k.key_id, k.public.hint) or (len(ref) >= 8 and k.key_id.startswith(ref.lower())):
                return k
        return None

    def with_role(self, role: Role) -> tuple[TrustedKey, ...]:
        return tuple(k for k in self.keys if k.role == role)

    @classmethod
    def of(cls, keys: Iterable[TrustedKey]) -> TrustSet:
        return cls(tuple(keys))


def check_scope(kinds: Sequence[str], names: str) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise TrustError(f"unknown kind(s) {', '.join(bad)}: use {', '.join(KINDS)}")
    if not names:
        raise TrustError("the name glob must not be empty (use '*' for every name)")


def load_trust_set(conn: sqlite3.Connection) -> TrustSet:
    rows = conn.execute("SELECT public_pem, kinds, names, role, source, added_at, comment FROM trust_keys "
                        "ORDER BY added_at, key_id").fetchall()
    keys = []
    for pem, kinds, names, role, source, added_at, comment in rows:
        keys.append(TrustedKey(public=load_public_pem(pem), kinds=tuple(json.loads(kinds)), names=names,
                               role=role, source=source, added_at=added_at, comment=comment))
    return TrustSet(tuple(keys))


def revoked_ids(conn: sqlite3.Connection) -> set[str]:
    return {str(r[0]) for r in conn.execute("SELECT key_id FROM trust_revoked")}


def upsert_key(db: sqlite_utils.Database, key: TrustedKey) -> None:
    """Inside a writer job: trust ``key``, or change the scope of a key already trusted."""
    db.execute(
        "INSERT INTO trust_keys (key_id, key_type, public_pem, kinds, names, role, source, added_at, comment) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key_id) DO UPDATE SET kinds = excluded.kinds, "
        "names = excluded.names, role = excluded.role, source = excluded.source, comment = excluded.comment",
        (key.key_id, key.public.key_type, key.public.pem, json.dumps(list(key.kinds)), key.names, key.role,
         key.source, key.added_at or time.time(), key.comment))


def add_key(key: TrustedKey) -> Callable[[sqlite_utils.Database], None]:
    """Writer job: trust ``key`` (or change its scope). Refuses a key a key-set update revoked."""
    def job(db: sqlite_utils.Database) -> None:
        if db.execute("SELECT 1 FROM trust_revoked WHERE key_id = ?", (key.key_id,)).fetchone():
            raise TrustError(f"key {key.key_id[:16]} was revoked by a key-set update; it cannot be trusted again")
        upsert_key(db, key)
    return job


def remove_key(ref: str) -> Callable[[sqlite_utils.Database], str]:
    """Writer job: forget a key by id / id prefix / hint; returns the removed id."""
    def job(db: sqlite_utils.Database) -> str:
        found = load_trust_set(db.conn).by_reference(ref)
        if found is None:
            raise TrustError(f"no trusted key matches {ref!r} (see 'edge-agent trust list')")
        db.execute("DELETE FROM trust_keys WHERE key_id = ?", (found.key_id,))
        return found.key_id
    return job
