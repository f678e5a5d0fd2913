"""DSSE (Dead Simple Signing Envelope): the pre-authentication encoding and the envelope JSON.

The signature covers ``PAE(payloadType, payload)``, never the JSON around it, so a re-encoded
envelope still verifies and a swapped payloadType does not.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from agent.trust.errors import MalformedBundle

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"


def pae(payload_type: str, payload: bytes) -> bytes:
    """``"DSSEv1" SP len(type) SP type SP len(body) SP body`` with ASCII decimal lengths."""
    t = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(t), t, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    sig: bytes
    keyid: str


@dataclass(frozen=True)
class Envelope:
    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [{"sig": base64.b64encode(s.sig).decode(), "keyid": s.keyid} for s in self.signatures],
        }


def b64decode(value: object, what: str) -> bytes:
    """Strict-ish base64 (standard or URL-safe alphabet, padding optional), as DSSE allows either."""
    if not isinstance(value, str):
        raise MalformedBundle(f"{what} must be a base64 string, got {type(value).__name__}")
    text = value.strip()
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MalformedBundle(f"{what} is not valid base64: {exc}") from None


def parse_envelope(obj: object) -> Envelope:
    if not isinstance(obj, dict):
        raise MalformedBundle("dsseEnvelope must be a JSON object")
    ptype = obj.get("payloadType")
    if not isinstance(ptype, str) or not ptype:
        raise MalformedBundle("dsseEnvelope.payloadType is missing")
    payload = b64decode(obj.get("payload"), "dsseEnvelope.payload")
    raw_sigs = obj.get("signatures", [])
    if not isinstance(raw_sigs, list):
        raise MalformedBundle("dsseEnvelope.signatures must be a list")
    sigs: list[Signature] = []
    for i, s in enumerate(raw_sigs):
        if not isinstance(s, dict):
            raise MalformedBundle(f"dsseEnvelope.signatures[{i}] must be an object")
        keyid = s.get("keyid", "")
        if not isinstance(keyid, str):
            raise MalformedBundle(f"dsseEnvelope.signatures[{i}].keyid must be a string")
        sig = b64decode(s.get("sig", ""), f"dsseEnvelope.signatures[{i}].sig")
        if sig:
            sigs.append(Signature(sig=sig, keyid=keyid))
    return Envelope(payload_type=ptype, payload=payload, signatures=tuple(sigs))
