"""Precompiled wasmtime code cached in SQLite, bound to the artifact's sha256 + the engine fingerprint.

wasmtime trusts whatever it deserializes (a tampered ``.cwasm`` is native code), so this cache only
ever loads bytes this agent wrote itself: each row carries an HMAC-SHA256 over
(sha256, fingerprint, code) under a per-state-dir secret (``<state_dir>/codecache.key``, 0600,
created by the agent). A row whose MAC does not match — written by someone else, corrupted, or from
another state dir — is ignored and recompiled. The fingerprint (wasmtime version + engine config +
CPU) makes a cache from another machine or another wasmtime miss instead of crash.

Rows live as long as a non-retired release references their sha256: the release store deletes the
others when it garbage-collects, so key this cache by the *release artifact's* sha256.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import sqlite_utils
import wasmtime

from agent import offload
from agent.logs import get_logger
from agent.storage import Store
from agent.wasm.engine import WasmEngine

log = get_logger("runtime")

KEY_FILE = "codecache.key"
_keys: dict[Path, bytes] = {}


def _db_path(conn: sqlite3.Connection) -> Path:
    for _, name, file in conn.execute("PRAGMA database_list"):
        if name == "main" and file:
            return Path(file)
    raise ValueError("the connection has no database file")


def cache_key(state_dir: Path, create: bool) -> bytes | None:
    """The per-state-dir MAC secret; created (0600) when ``create`` and missing."""
    path = state_dir / KEY_FILE
    if path in _keys:
        return _keys[path]
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
        key = path.read_bytes()  # another process may have won the O_EXCL race: read what is there
    except FileExistsError:
        key = path.read_bytes()
    except OSError:
        return None
    if len(key) < 32:
        return None
    _keys[path] = key
    return key


def _mac(key: bytes, sha256: str, fingerprint: str, code: bytes) -> str:
    h = hmac.new(key, digestmod=hashlib.sha256)
    h.update(f"{sha256}\n{fingerprint}\n".encode())
    h.update(code)
    return h.hexdigest()


def lookup(conn: sqlite3.Connection, engine: WasmEngine, sha256: str) -> wasmtime.Module | None:
    """The cached module if a row written by this agent (MAC ok) exists for this engine; else None."""
    key = cache_key(_db_path(conn).parent, create=False)
    if key is None:
        return None
    row = conn.execute("SELECT code, mac FROM code_cache WHERE sha256 = ? AND fingerprint = ?",
                       (sha256, engine.fingerprint)).fetchone()
    if row is None:
        return None
    code = bytes(row[0])
    if not hmac.compare_digest(str(row[1]), _mac(key, sha256, engine.fingerprint, code)):
        log.warning("codecache_mac_mismatch", sha256=sha256[:16])
        return None
    try:
        return engine.deserialize(code)
    except wasmtime.WasmtimeError as exc:
        log.warning("codecache_deserialize_failed", sha256=sha256[:16], error=str(exc).splitlines()[0])
        return None


def lookup_or_compile(conn: sqlite3.Connection, engine: WasmEngine, sha256: str,
                      wasm: bytes) -> tuple[wasmtime.Module, bytes | None]:
    """The module for artifact ``sha256``: from the cache when it holds it (then ``None`` as the second
    value), else compiled here, with its serialized code for the caller to store in its own transaction
    (the release store writes it together with the release, so a refused release leaves no row behind).

    Blocking (a compile takes ~100 ms for an OPA policy); raises ``wasmtime.WasmtimeError`` when ``wasm``
    does not compile on this engine.
    """
    cached = lookup(conn, engine, sha256)
    if cached is not None:
        return cached, None
    module = engine.compile(wasm)
    return module, engine.serialize(module)


def store_job(key: bytes, sha256: str, fingerprint: str, code: bytes) -> Callable[[sqlite_utils.Database], None]:
    def job(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO code_cache (sha256, fingerprint, code, mac, created_at) VALUES (?, ?, ?, ?, ?) "
                   "ON CONFLICT(sha256, fingerprint) DO UPDATE SET code = excluded.code, mac = excluded.mac, "
                   "created_at = excluded.created_at",
                   (sha256, fingerprint, code, _mac(key, sha256, fingerprint, code), time.time()))
    return job


def load_module(store_or_reader: Store | sqlite3.Connection, engine: WasmEngine, sha256: str,
                wasm_bytes_loader: Callable[[], bytes]) -> wasmtime.Module:
    """Deserialize cached code for (sha256, engine.fingerprint), else compile and cache it.

    Blocking (compile ~100 ms for an OPA policy): from async code call :func:`load_module_async`.
    ``wasm_bytes_loader`` returns the Wasm to compile for artifact ``sha256`` (for an OPA bundle:
    its ``policy.wasm``); it is only called on a miss. With a bare reader connection nothing is
    written (a miss just compiles).
    """
    own_conn = isinstance(store_or_reader, Store)
    conn = store_or_reader.reader() if isinstance(store_or_reader, Store) else store_or_reader
    try:
        module = lookup(conn, engine, sha256)
        if module is not None:
            return module
        state_dir = _db_path(conn).parent
    finally:
        if own_conn:
            conn.close()
    started = time.perf_counter()
    module = engine.compile(wasm_bytes_loader())
    compile_ms = (time.perf_counter() - started) * 1000
    if isinstance(store_or_reader, Store):
        key = cache_key(state_dir, create=True)
        if key is not None:
            store_or_reader.writer.run_sync(store_job(key, sha256, engine.fingerprint, engine.serialize(module)))
    log.info("codecache_compiled", sha256=sha256[:16], compile_ms=round(compile_ms, 1),
             cached=isinstance(store_or_reader, Store))
    return module


async def load_module_async(store: Store, engine: WasmEngine, sha256: str,
                            wasm_bytes_loader: Callable[[], bytes]) -> wasmtime.Module:
    return await offload.run_blocking(load_module, store, engine, sha256, wasm_bytes_loader)
