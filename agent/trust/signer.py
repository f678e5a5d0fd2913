"""Producing releases: in-toto statement → DSSE envelope → Sigstore bundle, signed with one key.

The output is the shape ``cosign attest-blob --new-bundle-format --tlog-upload=false`` writes, so
either tool can sign for a fleet. Used by ``edge-fleet sign`` and the tests' signer helper.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agent.trust.bundle import build_bundle, dump_bundle
from agent.trust.dsse import INTOTO_PAYLOAD_TYPE, Envelope, Signature, pae
from agent.trust.keys import PrivateKey
from agent.trust.predicate import RELEASE_PREDICATE_TYPE, parse_predicate
from agent.trust.statement import build_statement


def sign_statement(key: PrivateKey, subject_name: str, subject: bytes, predicate_type: str,
                   predicate: dict[str, Any]) -> bytes:
    """Sign any predicate about ``subject``; returns the bundle JSON bytes."""
    sha = hashlib.sha256(subject).hexdigest()
    payload = build_statement(subject_name, sha, predicate_type, predicate)
    sig = key.sign(pae(INTOTO_PAYLOAD_TYPE, payload))
    envelope = Envelope(payload_type=INTOTO_PAYLOAD_TYPE, payload=payload,
                        signatures=(Signature(sig=sig, keyid=""),))
    return dump_bundle(build_bundle(envelope, key.public.hint))


def release_predicate(kind: str, name: str, version: int, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """The predicate dict: ``meta`` (entrypoints, trigger, limits, …) plus kind/name/version, validated."""
    predicate: dict[str, Any] = dict(meta or {})
    predicate.update({"kind": kind, "name": name, "version": version})
    parse_predicate(predicate)  # refuse to sign what no agent would accept
    return predicate


def sign_release(key: PrivateKey, artifact: bytes, kind: str, name: str, version: int, *,
                 meta: dict[str, Any] | None = None, subject_name: str | None = None) -> bytes:
    return sign_statement(key, subject_name or name, artifact, RELEASE_PREDICATE_TYPE,
                          release_predicate(kind, name, version, meta))
