"""Key rotation and revocation without touching the box: root-signed key-set updates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.daemon.releases import release_store
from agent.storage import Store
from agent.trust import errors as E
from agent.trust.errors import TrustError
from agent.trust.keyset import apply_keyset_job
from agent.trust.truststore import add_key, load_trust_set
from agent_devkit.procs import run_agent, run_fleet
from agent_devkit.releases import Signer, wasm_module

WASM = wasm_module()




def key_ids(store: Store) -> dict[str, str]:
    conn = store.reader()
    try:
        return {k.key_id: k.role for k in load_trust_set(conn).keys}
    finally:
        conn.close()


def test_rotation_revocation_replay(store: Store) -> None:
    root, old, new = Signer.create(), Signer.create(), Signer.create("ed25519")
    store.writer.run_sync(add_key(root.trusted(role="root")))
    store.writer.run_sync(add_key(old.trusted()))
    rs = release_store(store)
    rs.install(WASM, old.sign(WASM, "module", "m", 1))
    # key set 1: add the new key (policies only), revoke the old one
    doc, bundle = root.sign_keyset(1, [(new, "release", ["module"], "*")], revoked=[old.key_id])
    ks = store.writer.run_sync(apply_keyset_job(doc, bundle))
    assert ks.sequence == 1 and ks.signer_key_id == root.key_id
    assert key_ids(store) == {root.key_id: "root", new.key_id: "release"}
    with pytest.raises(E.UnknownKey):
        rs.install(WASM, old.sign(WASM, "module", "m", 2))
    assert rs.install(WASM, new.sign(WASM, "module", "m", 2)).version == 2
    with pytest.raises(TrustError):  # a revoked key cannot simply be re-added
        store.writer.run_sync(add_key(old.trusted()))
    # replaying key set 1 (or any older sequence) is refused
    with pytest.raises(E.KeysetRejected):
        store.writer.run_sync(apply_keyset_job(doc, bundle))
    # a key set signed by a release key (not a root) is refused
    doc2, by_release = new.sign_keyset(2, [(new, "release", [], "*")])
    with pytest.raises(E.KeyOutOfScope):
        store.writer.run_sync(apply_keyset_job(doc2, by_release))
    # a key set whose content was changed after signing is refused
    _, good2 = root.sign_keyset(2, [(new, "release", [], "*")])
    forged = doc2.replace(b'"sequence": 2', b'"sequence": 2 ').replace(b"[]", b'["policy"]')
    with pytest.raises(E.DigestMismatch):
        store.writer.run_sync(apply_keyset_job(forged, good2))
    assert key_ids(store) == {root.key_id: "root", new.key_id: "release"}


def test_root_rotation_and_never_rootless(store: Store) -> None:
    root1, root2, rel = Signer.create(), Signer.create(), Signer.create()
    store.writer.run_sync(add_key(root1.trusted(role="root")))
    # a key set that revokes the only root without naming a new one would brick updates: refused
    doc, bundle = root1.sign_keyset(1, [(rel, "release", [], "*")], revoked=[root1.key_id])
    with pytest.raises(E.KeysetRejected):
        store.writer.run_sync(apply_keyset_job(doc, bundle))
    assert key_ids(store) == {root1.key_id: "root"}  # nothing applied
    doc, bundle = root1.sign_keyset(1, [(root2, "root", [], "*"), (rel, "release", [], "*")],
                                    revoked=[root1.key_id])
    store.writer.run_sync(apply_keyset_job(doc, bundle))
    assert key_ids(store) == {root2.key_id: "root", rel.key_id: "release"}
    # the old root can no longer sign updates; the new one can
    doc, bundle = root1.sign_keyset(2, [(rel, "release", [], "*")])
    with pytest.raises(E.UnknownKey):
        store.writer.run_sync(apply_keyset_job(doc, bundle))
    doc, bundle = root2.sign_keyset(2, [(root2, "root", [], "*")])
    store.writer.run_sync(apply_keyset_job(doc, bundle))
    assert key_ids(store) == {root2.key_id: "root"}  # rel came from a key set and is no longer listed


def test_keyset_via_cli(tmp_path: Path) -> None:
    state = tmp_path / "state"
    root, rel = Signer.create(), Signer.create()
    root_priv, root_pub = root.write(tmp_path / "root", "root")
    _, rel_pub = rel.write(tmp_path / "rel", "rel")
    sd = ("--state-dir", str(state))
    assert run_agent("trust", "add", str(root_pub), "--root", *sd).returncode == 0
    keyset = tmp_path / "keyset.json"
    keyset.write_text(json.dumps({"sequence": 1, "keys": [
        {"public_key": rel_pub.read_text(), "role": "release", "kinds": ["policy"], "names": "line1-*"},
        {"public_key": root_pub.read_text(), "role": "root"}]}))
    bundle = tmp_path / "keyset.sigstore.json"
    proc = run_fleet("keyset-sign", str(keyset), "--key", str(root_priv), "--out", str(bundle))
    assert proc.returncode == 0, proc.stderr
    proc = run_agent("trust", "update", str(keyset), "--bundle", str(bundle), *sd)
    assert proc.returncode == 0, proc.stderr
    listed = {k["key_id"]: k for k in json.loads(run_agent("trust", "list", "--json", *sd).stdout)}
    assert listed[rel.key_id]["kinds"] == ["policy"] and listed[rel.key_id]["source"] == "keyset:1"
    replay = run_agent("trust", "update", str(keyset), "--bundle", str(bundle), *sd)
    assert replay.returncode == 1 and "[keyset_rejected]" in replay.stderr
