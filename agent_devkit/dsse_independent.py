"""A deliberately independent DSSE / in-toto / Sigstore-bundle signer: raw ``cryptography`` calls only.

Nothing here imports ``agent.trust``: it is written from the specs (DSSE PAE, in-toto Statement v1,
Sigstore bundle v0.3 JSON), so the interop tests prove the agent reads what another implementation
of those specs writes — not merely what its own signer writes.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

PAYLOAD_TYPE = "application/vnd.in-toto+json"


def pae(payload_type: str, body: bytes) -> bytes:
    t = payload_type.encode("utf-8")
    return b"".join([b"DSSEv1", b" ", str(len(t)).encode("ascii"), b" ", t, b" ",
                     str(len(body)).encode("ascii"), b" ", body])


def new_key(kind: str = "ecdsa") -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())


def public_pem(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def hint(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> str:
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def raw_sign(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))  # DER-encoded (r, s), as cosign writes


def statement(artifact: bytes, predicate: dict[str, Any], predicate_type: str = "urn:edge-agent:release:v1",
              statement_type: str = "https://in-toto.io/Statement/v1") -> bytes:
    doc = {"_type": statement_type,
           "predicateType": predicate_type,
           "subject": [{"name": "artifact", "digest": {"sha256": hashlib.sha256(artifact).hexdigest()}}],
           "predicate": predicate}
    # different key order and spacing than the agent's signer, on purpose
    return json.dumps(doc, indent=1).encode()


def bundle(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, payload: bytes, *,
           payload_type: str = PAYLOAD_TYPE, with_hint: bool = True, urlsafe: bool = False) -> dict[str, Any]:
    sig = raw_sign(key, pae(payload_type, payload))
    enc = base64.urlsafe_b64encode if urlsafe else base64.standard_b64encode
    vm: dict[str, Any] = {"tlogEntries": []}
    if with_hint:
        vm["publicKey"] = {"hint": hint(key)}
    return {"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": vm,
            "dsseEnvelope": {"payloadType": payload_type, "payload": enc(payload).decode(),
                             "signatures": [{"keyid": "", "sig": enc(sig).decode()}]}}


def sign_release(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey, artifact: bytes, kind: str,
                 name: str, version: int, **extra: Any) -> bytes:
    predicate = {"version": version, "name": name, "kind": kind, **extra}
    return json.dumps(bundle(key, statement(artifact, predicate))).encode()
