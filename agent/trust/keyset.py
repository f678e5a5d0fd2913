"""Root-signed key-set updates: rotate and revoke release keys (and roots) without touching the box.

A key set is a JSON document (``urn:edge-agent:keyset:v1``)::

    {"sequence": 7,
     "keys": [{"public_key": "-----BEGIN PUBLIC KEY-----…", "role": "release",
               "kinds": ["policy"], "names": "line1-*", "comment": "CI signer 2026"}],
     "revoked": ["<hex key id>", …]}

signed like a release: a Sigstore bundle whose in-toto statement has the key set's sha256 as subject
and predicateType ``urn:edge-agent:keyset:v1`` (predicate = ``{"sequence": N}``), by a *root* key
the gateway already trusts. Applying it replaces every key an earlier key set installed, deletes
and blacklists revoked ids (local ones too), and records the sequence so an old set cannot be
replayed.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from agent import jsonsafe
from agent.trust.errors import DigestMismatch, KeysetRejected, TrustError
from agent.trust.keys import PrivateKey, load_public_pem
from agent.trust.signer import sign_statement
from agent.trust.truststore import ROLES, TrustedKey, TrustSet, check_scope, load_trust_set, upsert_key
from agent.trust.verify import verify_statement

KEYSET_PREDICATE_TYPE = "urn:edge-agent:keyset:v1"
SEQUENCE_KEY = "keyset_sequence"
KEYSET_LIMITS = jsonsafe.Limits(1024 * 1024, max_depth=16)


@dataclass(frozen=True)
class KeySet:
    sequence: int
    keys: tuple[TrustedKey, ...]
    revoked: tuple[str, ...]
    signer_key_id: str = ""


def parse_keyset(data: bytes) -> KeySet:
    try:
        obj = jsonsafe.loads(data, KEYSET_LIMITS)
    except jsonsafe.JsonRejected as exc:
        raise KeysetRejected(f"the key set is not accepted JSON ({exc.code}): {exc}") from None
    if not isinstance(obj, dict):
        raise KeysetRejected("the key set must be a JSON object")
    seq = obj.get("sequence")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise KeysetRejected("key set 'sequence' must be an integer >= 1")
    keys: list[TrustedKey] = []
    entries = obj.get("keys", [])
    if not isinstance(entries, list):
        raise KeysetRejected("key set 'keys' must be a list of objects")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("public_key"), str):
            raise KeysetRejected(f"key set keys[{i}] must be an object with a PEM 'public_key'")
        kinds_raw, names, comment = entry.get("kinds", []), entry.get("names", "*"), entry.get("comment", "")
        if not isinstance(kinds_raw, list) or not all(isinstance(k, str) for k in kinds_raw):
            raise KeysetRejected(f"key set keys[{i}].kinds must be a list of strings")
        if not isinstance(names, str) or not isinstance(comment, str):
            raise KeysetRejected(f"key set keys[{i}].names and .comment must be strings")
        try:
            pub = load_public_pem(entry["public_key"])
            kinds = tuple(kinds_raw)
            check_scope(kinds, names)
        except TrustError as exc:
            raise KeysetRejected(f"key set keys[{i}]: {exc}") from None
        role = entry.get("role", "release")
        if role not in ROLES:
            raise KeysetRejected(f"key set keys[{i}].role must be 'release' or 'root'")
        keys.append(TrustedKey(public=pub, kinds=kinds, names=names, role=role, source=f"keyset:{seq}",
                               comment=comment))
    revoked = obj.get("revoked", [])
    if not isinstance(revoked, list) or not all(isinstance(r, str) and len(r) == 64 for r in revoked):
        raise KeysetRejected("key set 'revoked' must be a list of 64-hex-digit key ids")
    if any(k.key_id in revoked for k in keys):
        raise KeysetRejected("the key set both lists and revokes the same key")
    return KeySet(sequence=seq, keys=tuple(keys), revoked=tuple(r.lower() for r in revoked))


def verify_keyset(keyset_bytes: bytes, bundle_json: bytes, trust: TrustSet, current_sequence: int) -> KeySet:
    """Signed by a trusted root key, digest matches, sequence newer; raises a ReleaseRejected subclass."""
    statement, signer = verify_statement(bundle_json, trust, "root", KEYSET_PREDICATE_TYPE)
    if hashlib.sha256(keyset_bytes).hexdigest() != statement.subject_sha256:
        raise DigestMismatch("the key-set file does not match the digest its bundle signs")
    ks = parse_keyset(keyset_bytes)
    pred = statement.predicate
    if not isinstance(pred, dict) or pred.get("sequence") != ks.sequence:
        raise KeysetRejected("the signed predicate's sequence differs from the key set's sequence")
    if ks.sequence <= current_sequence:
        raise KeysetRejected(f"key set sequence {ks.sequence} is not newer than the applied sequence "
                             f"{current_sequence} (replay of an old key set?)")
    return KeySet(sequence=ks.sequence, keys=ks.keys, revoked=ks.revoked, signer_key_id=signer.key_id)


def current_sequence(conn: Any) -> int:
    row = conn.execute("SELECT value FROM trust_state WHERE key = ?", (SEQUENCE_KEY,)).fetchone()
    return int(row[0]) if row else 0


def apply_keyset_job(keyset_bytes: bytes, bundle_json: bytes) -> Callable[[sqlite_utils.Database], KeySet]:
    """Writer job: verify against the trust store *inside* the transaction, then apply atomically."""
    def job(db: sqlite_utils.Database) -> KeySet:
        ks = verify_keyset(keyset_bytes, bundle_json, load_trust_set(db.conn), current_sequence(db.conn))
        now = time.time()
        db.execute("DELETE FROM trust_keys WHERE source LIKE 'keyset:%'")
        for rid in ks.revoked:
            db.execute("DELETE FROM trust_keys WHERE key_id = ?", (rid,))
            db.execute("INSERT OR IGNORE INTO trust_revoked (key_id, revoked_at, keyset_sequence) VALUES (?, ?, ?)",
                       (rid, now, ks.sequence))
        for key in ks.keys:
            if db.execute("SELECT 1 FROM trust_revoked WHERE key_id = ?", (key.key_id,)).fetchone():
                raise KeysetRejected(f"key set lists key {key.key_id[:16]}…, which an earlier key set revoked")
            upsert_key(db, key)
        if not load_trust_set(db.conn).with_role("root"):
            raise KeysetRejected("applying this key set would leave no root key: future updates would be "
                                 "impossible; include the new root key")
        db.execute("INSERT INTO trust_state (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                   "SET value = excluded.value, updated_at = excluded.updated_at",
                   (SEQUENCE_KEY, str(ks.sequence), now))
        return ks
    return job


def sign_keyset(root: PrivateKey, keyset_bytes: bytes) -> bytes:
    ks = parse_keyset(keyset_bytes)
    return sign_statement(root, "keyset.json", keyset_bytes, KEYSET_PREDICATE_TYPE, {"sequence": ks.sequence})


def keyset_document(sequence: int, keys: list[dict[str, Any]], revoked: list[str] | None = None) -> bytes:
    return (json.dumps({"sequence": sequence, "keys": keys, "revoked": revoked or []}, indent=2) + "\n").encode()
