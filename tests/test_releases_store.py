"""The release store on a real SQLite file: lifecycle, floors, GC, rejections that change nothing,
migrations, trusted time, and the precompiled-code cache."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from agent.daemon.releases import release_store
from agent.storage import Store
from agent.storage.migrations import COMPONENTS
from agent.trust import errors as E
from agent.trust.releases import ReleaseStoreError
from agent.trust.timekeeper import advance_job, last_good_time, trusted_now
from agent.trust.truststore import add_key
from agent.wasm import codecache
from agent.wasm.engine import WasmEngine
from agent_devkit import dsse_independent as indep
from agent_devkit.releases import Signer, opa_bundle, policy_wasm, wasm_module


@pytest.fixture
def signer() -> Signer:
    return Signer.create()


@pytest.fixture
def store(tmp_path: Path, signer: Signer) -> Iterator[Store]:
    s = Store.open(tmp_path / "state")
    s.writer.run_sync(add_key(signer.trusted(names="[!x]*")))  # scope: names not starting with x
    try:
        yield s
    finally:
        s.close()


def snapshot(store: Store) -> dict[str, Any]:
    conn = store.reader()
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall()
                for t in ("releases", "release_artifacts", "release_floors", "trust_keys", "code_cache")} | {
            "state": conn.execute("SELECT key, value FROM trust_state WHERE key != 'last_good_time'").fetchall()}
    finally:
        conn.close()


def test_install_activate_previous_gc(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    gens = [rs.generation()]
    blobs = [wasm_module(exports=(f"v{i}",)) for i in range(4)]
    for i, blob in enumerate(blobs, start=1):
        rel = rs.install(blob, signer.sign(blob, "module", "counter", i))
        assert rel.state == "active" and rel.version == i
        gens.append(rs.generation())
    assert len(set(gens)) == len(gens)  # every activation moves the generation
    states = {r.version: r.state for r in rs.list(include_retired=True)}
    assert states == {4: "active", 3: "previous", 2: "retired", 1: "retired"}
    active = rs.active("module", "counter")
    assert active is not None and rs.artifact_bytes(active.sha256) == blobs[3]
    with pytest.raises(ReleaseStoreError):  # retired bytes were garbage-collected
        rs.artifact_bytes(rs.list(include_retired=True)[-1].sha256)
    assert rs.floor("module", "counter") == 4


def test_corrupted_stored_bytes_are_never_returned(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    blob = wasm_module()
    rel = rs.install(blob, signer.sign(blob, "module", "m", 1))
    store.writer.run_sync(lambda db: db.execute("UPDATE release_artifacts SET data = ? WHERE sha256 = ?",
                                                (blob[:-1] + b"\x01", rel.sha256)))
    with pytest.raises(ReleaseStoreError) as info:
        rs.artifact_bytes(rel.sha256)
    assert info.value.code == "artifact_corrupt"


def test_stage_activate_rollback_keeps_floor(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    a, b = policy_wasm("a"), policy_wasm("b")  # real OPA-ABI policies: the store loads what it installs
    rs.install(a, signer.sign(a, "policy", "safety", 1))
    staged = rs.stage(b, signer.sign(b, "policy", "safety", 2))
    assert staged.state == "staged" and rs.active("policy", "safety").version == 1  # type: ignore[union-attr]
    assert rs.floor("policy", "safety") == 1
    rs.activate(staged.id)
    assert rs.active("policy", "safety").version == 2  # type: ignore[union-attr]
    back = rs.rollback("policy", "safety")
    assert back.version == 1 and rs.active("policy", "safety").version == 1  # type: ignore[union-attr]
    assert rs.floor("policy", "safety") == 2  # rollback never lowers the floor
    with pytest.raises(ReleaseStoreError):
        rs.rollback("policy", "safety")  # v2 was retired, nothing left to roll back to
    with pytest.raises(E.VersionNotNewer):  # the old v2 cannot be re-pushed either
        rs.install(b, signer.sign(b, "policy", "safety", 2))
    # the sanctioned way back: a NEW higher version carrying the old bytes
    assert rs.install(b, signer.sign(b, "policy", "safety", 3)).version == 3


def test_floor_survives_reinstall_gc_and_migration(tmp_path: Path, signer: Signer,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = tmp_path / "state"
    store = Store.open(state)
    store.writer.run_sync(add_key(signer.trusted()))
    rs = release_store(store)
    blob = wasm_module()
    for v in (1, 2, 3):
        rs.install(blob, signer.sign(blob, "module", "m", v))
    store.close()
    conn = sqlite3.connect(str(state / "agent.db"), isolation_level=None)
    try:
        with pytest.raises(sqlite3.IntegrityError):  # the floor is guarded in the schema itself
            conn.execute("UPDATE release_floors SET version = 1")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("DELETE FROM release_floors")
        # even if every release row vanished (manual clean-up), the floor stays
        conn.execute("DELETE FROM releases")
    finally:
        conn.close()
    # a newer agent ships a trust migration (rebuilding the releases table); Store.open applies it
    monkeypatch.setitem(COMPONENTS, "trust", [*COMPONENTS["trust"], """
        CREATE TABLE releases_new AS SELECT * FROM releases;
        DROP TABLE releases;
        ALTER TABLE releases_new RENAME TO releases;
        ALTER TABLE releases ADD COLUMN note TEXT NOT NULL DEFAULT '';
    """])
    store = Store.open(state)
    try:
        conn = store.reader()
        try:
            assert conn.execute("SELECT max(version) FROM schema_migrations WHERE component = 'trust'"
                                ).fetchone()[0] == len(COMPONENTS["trust"])
        finally:
            conn.close()
        rs = release_store(store)
        for v in (1, 2, 3):
            with pytest.raises(E.VersionNotNewer):
                rs.install(blob, signer.sign(blob, "module", "m", v))
        assert rs.floor("module", "m") == 3
    finally:
        store.close()


JUNK_GZ = b"\x1f\x8b" + b"junk" * 8


def _signed_statement(s: Signer, **changes: Any) -> tuple[bytes, bytes, dict[str, Any]]:
    """A correctly signed bundle whose statement was changed before signing (malformed on purpose)."""
    blob = wasm_module()
    st = json.loads(base64.b64decode(json.loads(s.sign(blob, "module", "m", 9))["dsseEnvelope"]["payload"]))
    for key, value in changes.items():
        if key.startswith("predicate_"):
            st["predicate"][key.removeprefix("predicate_")] = value
        else:
            st[key] = value
    return blob, json.dumps(indep.bundle(s.key.key, json.dumps(st).encode())).encode(), {}


NO_START = bytes(wasmtime.wat2wasm('(module (func (export "run")))'))


REJECTIONS: dict[str, Callable[[Signer], tuple[bytes, bytes, dict[str, Any]]]] = {
    "key_out_of_scope": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "x-not-allowed", 9), {}),
    "malformed_statement": lambda s: _signed_statement(s, _type="https://example.com/statement"),
    "malformed_predicate": lambda s: _signed_statement(s, predicate_version="nine"),
    "version_out_of_range": lambda s: _signed_statement(s, predicate_version=2**63),
    "wrong_predicate_type": lambda s: _signed_statement(s, predicateType="https://slsa.dev/provenance/v1"),
    "invalid_opa_bundle": lambda s: (JUNK_GZ, s.sign(JUNK_GZ, "policy", "p", 9), {}),
    "unsigned": lambda s: (wasm_module(), b'{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json"}', {}),
    "bad_signature": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 9).replace(
        b'"sig": "', b'"sig": "AAAA'), {}),
    "unknown_key": lambda s: (wasm_module(), Signer.create().sign(wasm_module(), "module", "m", 9), {}),
    "digest_mismatch": lambda s: (wasm_module(exports=("x",)), s.sign(wasm_module(), "module", "m", 9), {}),
    "malformed_bundle": lambda s: (wasm_module(), b"{", {}),
    "version_not_newer": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 1), {}),
    "expired": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 9,
                                                  expires="2001-01-01T00:00:00Z"), {}),
    "not_yet_valid": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 9,
                                                        not_before="2999-01-01T00:00:00Z"), {}),
    "invalid_wasm": lambda s: (b"\x00asm\x01\x00\x00\x00\x99", s.sign(b"\x00asm\x01\x00\x00\x00\x99", "module",
                                                                       "m", 9), {}),
    "unsafe_archive": lambda s: (opa_bundle(symlink="x"), s.sign(opa_bundle(symlink="x"), "policy", "p", 9), {}),
    "oversize": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 9), {"max_artifact_bytes": 10}),
    "agent_too_old": lambda s: (wasm_module(), s.sign(wasm_module(), "module", "m", 9,
                                                        min_agent_version="1000.0"), {}),
    # needs builtins custom.* that the agent does not provide
    "policy_unsupported": lambda s: (policy_wasm(policy="builtins"), s.sign(policy_wasm(policy="builtins"),
                                                                          "policy", "p", 9), {}),
    # valid Wasm, but no _start: not a WASI command
    "module_unsupported": lambda s: (NO_START, s.sign(NO_START, "module", "m", 9), {}),
}


def test_every_rule_has_a_stateful_rejection_test() -> None:
    assert set(REJECTIONS) == set(E.ALL_CODES)


@pytest.mark.parametrize("code", sorted(REJECTIONS))
def test_rejection_leaves_installed_state_untouched(store: Store, signer: Signer, code: str) -> None:
    rs = release_store(store)
    first = wasm_module(exports=("first",))
    rs.install(first, signer.sign(first, "module", "m", 1))
    p1 = opa_bundle()
    rs.install(p1, signer.sign(p1, "policy", "p", 1))
    before = snapshot(store)
    artifact, bundle, kw = REJECTIONS[code](signer)
    for action in ("install", "stage"):
        with pytest.raises(E.ReleaseRejected) as info:
            getattr(release_store(store, **kw), action)(artifact, bundle)
        assert info.value.code == code
        assert snapshot(store) == before
    conn = store.reader()
    try:  # the rejection is in the technician's error log with its code
        assert conn.execute("SELECT count(*) FROM errors WHERE component = 'trust' AND code = ?",
                            (code,)).fetchone()[0] == 2
    finally:
        conn.close()


def test_trusted_time_survives_clock_reset(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    real_now = time.time()
    blob = wasm_module()
    rs.install(blob, signer.sign(blob, "module", "m", 1, not_before="2025-01-01T00:00:00Z",
                                 expires="2999-01-01T00:00:00Z"), system_now=real_now)
    conn = store.reader()
    try:
        assert last_good_time(conn) == pytest.approx(real_now)
        # the gateway reboots without RTC: system clock says 1970
        assert trusted_now(conn, system_now=0.0) == pytest.approx(real_now)
    finally:
        conn.close()
    # the persisted time never goes backwards
    assert store.writer.run_sync(advance_job(0.0)) == pytest.approx(real_now)
    # at "1970" a release valid from 2025 still installs, and what was installed stays active
    blob2 = wasm_module(exports=("two",))
    rel = rs.install(blob2, signer.sign(blob2, "module", "m", 2, not_before="2025-01-01T00:00:00Z",
                                        expires="2999-01-01T00:00:00Z"), system_now=0.0)
    assert rel.state == "active"
    # a release that expired by trusted time is refused even if the clock is set back to before its expiry
    blob3 = wasm_module(exports=("three",))
    with pytest.raises(E.Expired):
        rs.install(blob3, signer.sign(blob3, "module", "m", 3, expires="2025-06-01T00:00:00Z"),
                   system_now=1_740_000_000.0)
    assert [r.version for r in rs.list()] == [2, 1]


def test_future_clock_is_not_persisted_beyond_a_bounded_step(store: Store, signer: Signer) -> None:
    from agent.trust.timekeeper import CATCH_UP_RATE, ELAPSED_SLACK_S, MAX_FORWARD_STEP_S
    day = 86400.0
    real_now = time.time()
    assert store.writer.run_sync(advance_job(real_now)) == pytest.approx(real_now)
    # someone sets the clock to 2099: an install (nothing measured) moves the stored floor one step
    future = real_now + 70 * 365 * day
    assert store.writer.run_sync(advance_job(future)) == pytest.approx(real_now + MAX_FORWARD_STEP_S)
    floor = real_now + MAX_FORWARD_STEP_S
    # the daemon keeps persisting every 5 minutes while the clock stays wrong: only measured time counts
    for _ in range(3):
        floor += 300 * (1 + CATCH_UP_RATE) + ELAPSED_SLACK_S
        assert store.writer.run_sync(advance_job(future, elapsed_s=300)) == pytest.approx(floor)
    # the clock is corrected: a release expiring in a month installs (it would be "expired" at 2099)
    rs = release_store(store)
    blob = wasm_module()
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(real_now + 30 * day))
    rel = rs.install(blob, signer.sign(blob, "module", "m", 1, expires=expires), system_now=real_now + 60)
    assert rel.state == "active"
    conn = store.reader()
    try:  # a clock going back below the stored floor is still refused as before
        assert last_good_time(conn) == pytest.approx(floor)
        assert trusted_now(conn, system_now=0.0) == pytest.approx(floor)
    finally:
        conn.close()
    # ordinary progress within what was measured is taken exactly; going backwards never lowers it
    assert store.writer.run_sync(advance_job(floor + 3600, elapsed_s=3600)) == pytest.approx(floor + 3600)
    assert store.writer.run_sync(advance_job(floor, elapsed_s=10)) == pytest.approx(floor + 3600)
    # a floor left a week behind (long power-off) catches up while running, faster than real time
    behind = floor + 3600
    now = behind + 7 * day
    stored = store.writer.run_sync(advance_job(now, elapsed_s=day))
    assert stored == pytest.approx(behind + day * (1 + CATCH_UP_RATE) + ELAPSED_SLACK_S)


def test_codecache_roundtrip_binding_and_tamper(store: Store, tmp_path: Path) -> None:
    engine = WasmEngine()
    blob = wasm_module(exports=("run", "other"))
    sha = "ab" * 32
    calls: list[int] = []

    def loader() -> bytes:
        calls.append(1)
        return blob

    m1 = codecache.load_module(store, engine, sha, loader)
    assert calls == [1] and sorted(e.name for e in m1.exports) == ["_start", "other", "run"]
    key_file = store.path.parent / codecache.KEY_FILE
    assert key_file.stat().st_mode & 0o777 == 0o600
    m2 = codecache.load_module(store, engine, sha, loader)
    assert calls == [1]  # served from the cache: no recompile
    assert sorted(e.name for e in m2.exports) == ["_start", "other", "run"]
    # another engine fingerprint (other wasmtime / config / CPU) misses instead of loading foreign code
    other = WasmEngine()
    other.fingerprint = "0" * 64
    codecache.load_module(store, other, sha, loader)
    assert calls == [1, 1]
    # bytes the agent did not write (MAC mismatch) are never deserialized: recompiled instead
    evil = wasm_module(exports=("evil",))
    forged = engine.serialize(engine.compile(evil))
    store.writer.run_sync(lambda db: db.execute("UPDATE code_cache SET code = ? WHERE sha256 = ? AND fingerprint = ?",
                                                (forged, sha, engine.fingerprint)))
    m3 = codecache.load_module(store, engine, sha, loader)
    assert calls == [1, 1, 1] and sorted(e.name for e in m3.exports) == ["_start", "other", "run"]
    # a read-only reader compiles on a miss and writes nothing
    conn = store.reader()
    try:
        codecache.load_module(conn, engine, "cd" * 32, loader)
        assert conn.execute("SELECT count(*) FROM code_cache WHERE sha256 = ?", ("cd" * 32,)).fetchone()[0] == 0
    finally:
        conn.close()


def test_async_variants(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    blob = wasm_module()

    async def main() -> None:
        rel = await rs.ainstall(blob, signer.sign(blob, "module", "m", 1))
        assert rel.state == "active" and await rs.aartifact_bytes(rel.sha256) == blob
        mod = await codecache.load_module_async(store, WasmEngine(), rel.sha256, lambda: blob)
        assert [e.name for e in mod.exports] == ["_start", "run"]
    asyncio.run(main())
