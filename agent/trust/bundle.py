"""Sigstore bundle JSON (``application/vnd.dev.sigstore.bundle.v0.3+json``) with a DSSE envelope.

Only what key-based, offline verification needs is read: the media type, the public-key hint and the
``dsseEnvelope``. Transparency-log entries and timestamps, if present, are kept but not required
(factories are air-gapped). Writing produces the same shape ``cosign attest-blob --new-bundle-format
--tlog-upload=false`` does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from agent import jsonsafe
from agent.trust.dsse import Envelope, parse_envelope
from agent.trust.errors import MalformedBundle, Unsigned

MEDIA_TYPE_V03 = "application/vnd.dev.sigstore.bundle.v0.3+json"
ACCEPTED_MEDIA_TYPES = (
    MEDIA_TYPE_V03,
    "application/vnd.dev.sigstore.bundle+json;version=0.3",
    "application/vnd.dev.sigstore.bundle+json;version=0.2",
)
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
BUNDLE_LIMITS = jsonsafe.Limits(MAX_BUNDLE_BYTES, max_depth=32)


@dataclass(frozen=True)
class Bundle:
    media_type: str
    key_hint: str | None
    envelope: Envelope
    raw: dict[str, Any]


def parse_bundle(data: bytes) -> Bundle:
    """Parse bundle bytes; raise MalformedBundle / Unsigned with the precise problem."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise MalformedBundle(f"the bundle is {len(data)} bytes; bundles over {MAX_BUNDLE_BYTES} are refused")
    try:
        obj = jsonsafe.loads(data, BUNDLE_LIMITS)
    except jsonsafe.JsonRejected as exc:
        raise MalformedBundle(f"the bundle is not accepted JSON ({exc.code}): {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedBundle("the bundle must be a JSON object")
    media_type = obj.get("mediaType")
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise MalformedBundle(f"unsupported bundle mediaType {media_type!r}; expected {MEDIA_TYPE_V03!r}")
    vm = obj.get("verificationMaterial", {})
    if not isinstance(vm, dict):
        raise MalformedBundle("verificationMaterial must be an object")
    hint: str | None = None
    pk = vm.get("publicKey")
    if pk is not None:
        if not isinstance(pk, dict) or not isinstance(pk.get("hint", ""), str):
            raise MalformedBundle("verificationMaterial.publicKey must be an object with a string hint")
        hint = pk.get("hint") or None
    if "dsseEnvelope" not in obj:
        if "messageSignature" in obj:
            raise MalformedBundle("the bundle holds a plain blob signature (cosign sign-blob), not an attestation; "
                                  "sign with cosign attest-blob or edge-fleet sign so the version is signed too")
        raise Unsigned("the bundle has no dsseEnvelope: the release is not signed")
    envelope = parse_envelope(obj["dsseEnvelope"])
    if not envelope.signatures:
        raise Unsigned("the bundle's DSSE envelope carries no signature: the release is not signed")
    return Bundle(media_type=str(media_type), key_hint=hint, envelope=envelope, raw=obj)


def build_bundle(envelope: Envelope, key_hint: str) -> dict[str, Any]:
    """The bundle JSON object for a key-signed DSSE envelope (no transparency-log entry)."""
    return {
        "mediaType": MEDIA_TYPE_V03,
        "verificationMaterial": {"publicKey": {"hint": key_hint}, "tlogEntries": [],
                                 "timestampVerificationData": {}},
        "dsseEnvelope": envelope.to_json(),
    }


def dump_bundle(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()
