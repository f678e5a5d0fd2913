"""Signing keys: ECDSA P-256/SHA-256 (cosign's default, DER signatures) and Ed25519, as PEM.

A key's id is the hex SHA-256 of its DER SubjectPublicKeyInfo; the Sigstore bundle's
``publicKey.hint`` carries the same digest base64-encoded (as sigstore-go writes it).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.trust.errors import TrustError

KeyType = Literal["ecdsa-p256", "ed25519"]
KEY_TYPES: tuple[KeyType, ...] = ("ecdsa-p256", "ed25519")
PublicKeyObj = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKeyObj = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class PublicKey:
    """A verified-parseable public key with its id and type."""

    key: PublicKeyObj
    key_type: KeyType
    key_id: str
    pem: str

    @property
    def hint(self) -> str:
        return base64.b64encode(bytes.fromhex(self.key_id)).decode()

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            if isinstance(self.key, ed25519.Ed25519PublicKey):
                self.key.verify(signature, message)
            else:
                self.key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True)
class PrivateKey:
    key: PrivateKeyObj
    public: PublicKey

    def sign(self, message: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(message)
        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption())
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _wrap_public(key: object) -> PublicKey:
    if isinstance(key, ed25519.Ed25519PublicKey):
        key_type: KeyType = "ed25519"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise TrustError(f"unsupported ECDSA curve {key.curve.name}: only P-256 (cosign's default) is accepted")
        key_type = "ecdsa-p256"
    else:
        raise TrustError(f"unsupported key type {type(key).__name__}: use ECDSA P-256 or Ed25519")
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return PublicKey(key=key, key_type=key_type, key_id=hashlib.sha256(der).hexdigest(), pem=pem)


def load_public_pem(data: bytes | str) -> PublicKey:
    """Parse a PEM SubjectPublicKeyInfo (``cosign.pub``); raise TrustError with the reason."""
    raw = data.encode() if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(raw)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"not a PEM public key (expected '-----BEGIN PUBLIC KEY-----'): {exc}") from None
    return _wrap_public(key)


def load_private_pem(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Parse a PKCS#8 PEM private key (optionally encrypted)."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as exc:
        raise TrustError(f"the private key is encrypted: give its passphrase ({exc})") from None
    except ValueError as exc:
        raise TrustError(f"cannot read the private key (wrong passphrase or not a PEM key): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise TrustError(f"unsupported private key type {type(key).__name__}: use ECDSA P-256 or Ed25519")
    return PrivateKey(key=key, public=_wrap_public(key.public_key()))


def generate(key_type: KeyType = "ecdsa-p256") -> PrivateKey:
    key: PrivateKeyObj
    if key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise TrustError(f"unknown key type {key_type!r}: use one of {', '.join(KEY_TYPES)}")
    return PrivateKey(key=key, public=_wrap_public(key.public_key()))
