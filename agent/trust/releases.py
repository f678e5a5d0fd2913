"""The release store: verified artifacts in SQLite, their lifecycle, version floors, a generation counter.

States per kind+name: at most one ``active`` and one ``previous`` (for rollback); ``staged`` is
verified and stored but not running; ``retired`` is history (its bytes are garbage-collected once no
live release shares them). Every transition is one writer job, so a crash leaves either the old or
the new state. The floor per kind+name is the highest version ever activated: it never goes down
(rollback re-activates ``previous`` without touching it), survives GC, reinstalls and migrations.

Reads use their own reader connections; writes go through the process's one writer. The CLI
(``edge-agent install``) and the daemon may both write: SQLite serialises the two processes and
``generation`` tells the daemon's :class:`~agent.trust.watcher.ReleaseWatcher` something changed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import sqlite_utils

from agent import offload
from agent.errors import AgentError
from agent.logs import get_logger
from agent.storage import Store
from agent.trust.catalog import (
    GENERATION_KEY,
    SEEN_GENERATION_KEY,
    Release,
    active_release,
    floor_of,
    floors,
    generation,
    get_release,
    list_releases,
    previous_release,
)
from agent.trust.errors import ReleaseRejected, VersionNotNewer
from agent.trust.runnable import Runnable, RunnableCheck, check_runnable
from agent.trust.timekeeper import advance_job, trusted_now
from agent.trust.truststore import TrustSet, load_trust_set
from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES, VerifiedRelease, check_floor, verify_release

log = get_logger("trust")

__all__ = ["GENERATION_KEY", "SEEN_GENERATION_KEY", "Release", "ReleaseStore", "ReleaseStoreError", "active_release",
           "floor_of", "floors", "generation", "get_release", "list_releases", "seen_generation_job"]

RETIRED_KEPT = 10  # retired rows (metadata only) kept per kind+name for the history in status


class ReleaseStoreError(AgentError):
    """A lifecycle request that does not fit the stored state (no such release, nothing to roll back to)."""

    code = "release_state"


# ---------------------------------------------------------------------------------------- writes

def _set_state(db: sqlite_utils.Database, key: str, value: str) -> None:
    db.execute("INSERT INTO trust_state (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
               "SET value = excluded.value, updated_at = excluded.updated_at", (key, value, time.time()))


def seen_generation_job(gen: int) -> Callable[[sqlite_utils.Database], None]:
    """Writer job: the daemon has acted on release generation ``gen`` (``status`` compares it with the
    current generation to tell an install the daemon has not picked up yet)."""
    return lambda db: _set_state(db, SEEN_GENERATION_KEY, str(gen))


def _bump_generation(db: sqlite_utils.Database) -> int:
    gen = generation(db.conn) + 1
    _set_state(db, GENERATION_KEY, str(gen))
    return gen


def _raise_floor(db: sqlite_utils.Database, kind: str, name: str, version: int) -> None:
    db.execute("INSERT INTO release_floors (kind, name, version, updated_at) VALUES (?, ?, ?, ?) "
               "ON CONFLICT(kind, name) DO UPDATE SET version = max(version, excluded.version), "
               "updated_at = excluded.updated_at", (kind, name, version, time.time()))


def _gc(db: sqlite_utils.Database, kind: str, name: str) -> None:
    """Keep active + previous (+ staged); drop bytes nobody live references; bound the history."""
    db.execute("DELETE FROM releases WHERE kind = ? AND name = ? AND state = 'retired' AND id NOT IN "
               "(SELECT id FROM releases WHERE kind = ? AND name = ? AND state = 'retired' "
               "ORDER BY id DESC LIMIT ?)", (kind, name, kind, name, RETIRED_KEPT))
    live = "(SELECT sha256 FROM releases WHERE state != 'retired')"
    db.execute(f"DELETE FROM release_artifacts WHERE sha256 NOT IN {live}")
    db.execute(f"DELETE FROM code_cache WHERE sha256 NOT IN {live}")


def _stage(db: sqlite_utils.Database, v: VerifiedRelease, artifact: bytes, bundle: bytes, source: str) -> int:
    conn = db.conn
    check_floor(v.predicate, floor_of(conn, v.kind, v.name))  # re-check inside the transaction
    dup = conn.execute("SELECT id, state FROM releases WHERE kind = ? AND name = ? AND version = ?",
                       (v.kind, v.name, v.version)).fetchone()
    if dup is not None:
        raise VersionNotNewer(f"{v.kind} {v.name} v{v.version} is already stored (state {dup[1]}); publish a "
                              "higher version")
    now = time.time()
    db.execute("UPDATE releases SET state = 'retired', retired_at = ? WHERE kind = ? AND name = ? AND "
               "state = 'staged'", (now, v.kind, v.name))
    db.execute("INSERT OR IGNORE INTO release_artifacts (sha256, size, data, created_at) VALUES (?, ?, ?, ?)",
               (v.sha256, v.size, artifact, now))
    cur = conn.execute(
        "INSERT INTO releases (kind, name, version, sha256, size, state, signer_key_id, predicate, bundle, source,"
        " installed_at) VALUES (?, ?, ?, ?, ?, 'staged', ?, ?, ?, ?, ?)",
        (v.kind, v.name, v.version, v.sha256, v.size, v.signer_key_id, json.dumps(v.predicate.raw, sort_keys=True),
         bundle, source, now))
    _bump_generation(db)
    return int(cur.lastrowid or 0)


def _activate(db: sqlite_utils.Database, release_id: int) -> Release:
    rel = get_release(db.conn, release_id)
    if rel is None:
        raise ReleaseStoreError(f"no release with id {release_id}")
    if rel.state != "staged":
        raise ReleaseStoreError(f"{rel.kind} {rel.name} v{rel.version} is {rel.state}, only a staged release can "
                                "be activated (use rollback to return to the previous one)")
    check_floor(rel.predicate, floor_of(db.conn, rel.kind, rel.name))
    now = time.time()
    key = (rel.kind, rel.name)
    db.execute("UPDATE releases SET state = 'retired', retired_at = ? WHERE kind = ? AND name = ? AND "
               "state = 'previous'", (now, *key))
    db.execute("UPDATE releases SET state = 'previous' WHERE kind = ? AND name = ? AND state = 'active'", key)
    db.execute("UPDATE releases SET state = 'active', activated_at = ? WHERE id = ?", (now, release_id))
    _raise_floor(db, rel.kind, rel.name, rel.version)
    _bump_generation(db)
    _gc(db, *key)
    out = get_release(db.conn, release_id)
    assert out is not None
    return out


def _rollback(db: sqlite_utils.Database, kind: str, name: str) -> Release:
    prev = previous_release(db.conn, kind, name)
    if prev is None:
        raise ReleaseStoreError(f"{kind} {name} has no previous release to roll back to")
    now = time.time()
    db.execute("UPDATE releases SET state = 'retired', retired_at = ? WHERE kind = ? AND name = ? AND "
               "state = 'active'", (now, kind, name))
    db.execute("UPDATE releases SET state = 'active', activated_at = ? WHERE id = ?", (now, prev.id))
    _bump_generation(db)
    _gc(db, kind, name)
    out = get_release(db.conn, prev.id)
    assert out is not None
    return out


# ----------------------------------------------------------------------------------------- facade

class ReleaseStore:
    """Verified releases over the :class:`Store` (its writer for writes, fresh readers for reads).

    Synchronous methods block (verification hashes and validates the Wasm): from async code use the
    ``a*`` variants, which move the work to the offload pool and await the writer.
    """

    def __init__(self, store: Store, *, checkers: Mapping[str, RunnableCheck] | None = None,
                 max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> None:
        """``checkers``: per kind, the runtime's "can this run here" check (see :mod:`agent.trust.runnable`),
        built with the daemon's own settings so an install refuses exactly what the daemon could not load.
        Without one for a kind, releases of that kind are refused; reading and rolling back need none."""
        self.store = store
        self.max_artifact_bytes = max_artifact_bytes
        self.checkers: Mapping[str, RunnableCheck] = dict(checkers or {})

    @contextmanager
    def reader(self) -> Iterator[sqlite3.Connection]:
        conn = self.store.reader()
        try:
            yield conn
        finally:
            conn.close()

    # -- verification ---------------------------------------------------------------------------
    def trust_set(self) -> TrustSet:
        with self.reader() as conn:
            return load_trust_set(conn)

    def verify(self, artifact: bytes, bundle: bytes, *, system_now: float | None = None) -> VerifiedRelease:
        """Verify against the persisted trust store, floors and trusted time, then check this agent can
        run it (``runnable``); record a rejection."""
        return self._verify(artifact, bundle, system_now=system_now)[0]

    def _verify(self, artifact: bytes, bundle: bytes, *,
                system_now: float | None = None) -> tuple[VerifiedRelease, Runnable]:
        with self.reader() as conn:
            trust, fl, now = load_trust_set(conn), floors(conn), trusted_now(conn, system_now)
            try:
                v = verify_release(artifact, bundle, trust, fl, now, max_artifact_bytes=self.max_artifact_bytes)
                runnable = check_runnable(v, artifact, conn, self.checkers)
            except ReleaseRejected as exc:
                self._rejected(exc)
                raise
        return v, runnable

    def _cache_job(self, v: VerifiedRelease, runnable: Runnable) -> Callable[[sqlite_utils.Database], None]:
        """Store freshly compiled code with the release (same transaction), so the daemon skips the compile."""
        from agent.wasm import codecache  # loads wasmtime: `status` reaches this module and never needs it

        key = codecache.cache_key(self.store.path.parent, create=True) if runnable.code is not None else None

        def job(db: sqlite_utils.Database) -> None:
            if key is not None and runnable.code is not None:
                codecache.store_job(key, v.sha256, runnable.fingerprint, runnable.code)(db)
        return job

    def _rejected(self, exc: ReleaseRejected) -> None:
        log.warning("release_rejected", code=exc.code, reason=str(exc))
        try:
            self.store.record_error_sync("trust", exc.code, str(exc))
        except AgentError as err:  # the rejection itself stands; the log line above has it
            log.error("release_rejection_not_recorded", error=str(err))

    def _write(self, job: Callable[[sqlite_utils.Database], Any]) -> Any:
        try:
            return self.store.writer.run_sync(job)
        except ReleaseRejected as exc:
            self._rejected(exc)
            raise

    # -- lifecycle --------------------------------------------------------------------------------
    def stage(self, artifact: bytes, bundle: bytes, *, source: str = "cli",
              system_now: float | None = None) -> Release:
        """Verify and store as ``staged`` (not running). A staged release of the same name is retired."""
        rel = self._store(artifact, bundle, source, system_now, activate=False)
        log.info("release_staged", kind=rel.kind, name=rel.name, version=rel.version, sha256=rel.sha256,
                 signer=rel.signer_key_id[:16], source=source)
        return rel

    def _store(self, artifact: bytes, bundle: bytes, source: str, system_now: float | None, *,
               activate: bool) -> Release:
        """Verify, then stage (and activate) with the compiled code and trusted time in one transaction."""
        v, runnable = self._verify(artifact, bundle, system_now=system_now)
        cache = self._cache_job(v, runnable)

        def job(db: sqlite_utils.Database) -> Release:
            rid = _stage(db, v, artifact, bundle, source)
            cache(db)
            advance_job(system_now)(db)
            if activate:
                return _activate(db, rid)
            out = get_release(db.conn, rid)
            assert out is not None
            return out
        rel: Release = self._write(job)
        return rel

    def activate(self, release_id: int) -> Release:
        """Make a staged release active; the old active becomes previous; the floor rises. Atomic."""
        rel: Release = self._write(lambda db: _activate(db, release_id))
        log.info("release_activated", kind=rel.kind, name=rel.name, version=rel.version, sha256=rel.sha256)
        return rel

    def install(self, artifact: bytes, bundle: bytes, *, source: str = "cli",
                system_now: float | None = None) -> Release:
        """Verify + store + activate in one transaction (the air-gap path and simple fleet pushes)."""
        rel = self._store(artifact, bundle, source, system_now, activate=True)
        log.info("release_installed", kind=rel.kind, name=rel.name, version=rel.version, sha256=rel.sha256,
                 signer=rel.signer_key_id[:16], source=source)
        return rel

    def rollback(self, kind: str, name: str) -> Release:
        """Re-activate ``previous`` (the active one is retired). The floor is NOT lowered."""
        rel: Release = self._write(lambda db: _rollback(db, kind, name))
        log.warning("release_rolled_back", kind=kind, name=name, version=rel.version)
        return rel

    def retire(self, release_id: int) -> None:
        """Drop a staged release (e.g. it failed its shadow evaluation)."""
        def job(db: sqlite_utils.Database) -> None:
            rel = get_release(db.conn, release_id)
            if rel is None or rel.state != "staged":
                raise ReleaseStoreError(f"release {release_id} is not staged")
            db.execute("UPDATE releases SET state = 'retired', retired_at = ? WHERE id = ?", (time.time(), release_id))
            _bump_generation(db)
            _gc(db, rel.kind, rel.name)
        self._write(job)

    # -- reads ------------------------------------------------------------------------------------
    def active(self, kind: str, name: str) -> Release | None:
        with self.reader() as conn:
            return active_release(conn, kind, name)

    def get(self, release_id: int) -> Release | None:
        with self.reader() as conn:
            return get_release(conn, release_id)

    def list(self, include_retired: bool = False) -> list[Release]:
        with self.reader() as conn:
            return list_releases(conn, include_retired)

    def floor(self, kind: str, name: str) -> int | None:
        with self.reader() as conn:
            return floor_of(conn, kind, name)

    def generation(self) -> int:
        with self.reader() as conn:
            return generation(conn)

    def artifact_bytes(self, sha256: str) -> bytes:
        """The stored bytes, re-checked against their sha256 (so only verified bytes are ever run)."""
        with self.reader() as conn:
            row = conn.execute("SELECT data FROM release_artifacts WHERE sha256 = ?", (sha256,)).fetchone()
        if row is None:
            raise ReleaseStoreError(f"no stored artifact with sha256 {sha256[:16]}…")
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != sha256:  # disk bit rot or tampering since verification
            log.error("release_artifact_corrupt", sha256=sha256)
            raise ReleaseStoreError(f"the stored artifact {sha256[:16]}… no longer matches its signed digest; "
                                    "reinstall the release (the database may be damaged)", code="artifact_corrupt")
        return data

    def bundle_bytes(self, release_id: int) -> bytes:
        with self.reader() as conn:
            row = conn.execute("SELECT bundle FROM releases WHERE id = ?", (release_id,)).fetchone()
        if row is None:
            raise ReleaseStoreError(f"no release with id {release_id}")
        return bytes(row[0])

    # -- async variants (daemon code) -------------------------------------------------------------
    async def ainstall(self, artifact: bytes, bundle: bytes, *, source: str = "fleet") -> Release:
        return await offload.run_blocking(self.install, artifact, bundle, source=source)

    async def astage(self, artifact: bytes, bundle: bytes, *, source: str = "fleet") -> Release:
        return await offload.run_blocking(self.stage, artifact, bundle, source=source)

    async def aactivate(self, release_id: int) -> Release:
        return await offload.run_blocking(self.activate, release_id)

    async def arollback(self, kind: str, name: str) -> Release:
        return await offload.run_blocking(self.rollback, kind, name)

    async def aretire(self, release_id: int) -> None:
        await offload.run_blocking(self.retire, release_id)

    async def aartifact_bytes(self, sha256: str) -> bytes:
        return await offload.run_blocking(self.artifact_bytes, sha256)
