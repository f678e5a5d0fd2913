"""A throw-away PKI for tests: a CA, a loopback server certificate and client certificates.

Generated with ``cryptography`` in the test (nothing checked in). Client certificates carry the
identity in the CN; the fleet broker maps it to the MQTT user name (``use_identity_as_username``),
which is what the ACL's ``%u`` patterns match.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent_devkit import REPO


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


class TestPKI:
    """``ca`` signs everything; ``server()`` for Mosquitto, ``client(cn)`` per gateway/manager."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self._ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._ca_cert = (
            x509.CertificateBuilder().subject_name(_name("edge-agent test CA")).issuer_name(_name("edge-agent test CA"))
            .public_key(self._ca_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._ca_key.public_key()), critical=False)
            .sign(self._ca_key, hashes.SHA256()))
        self.ca = self.dir / "ca.pem"
        self.ca.write_bytes(self._ca_cert.public_bytes(serialization.Encoding.PEM))

    def _issue(self, cn: str, stem: str, *, server: bool) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self._ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        files = CertFiles(self.dir / f"{stem}.crt", self.dir / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, files.key)
        return files

    def server(self) -> CertFiles:
        return self._issue("localhost", "server", server=True)

    def client(self, cn: str) -> CertFiles:
        return self._issue(cn, f"client-{cn}", server=False)


ACL_FILE = REPO / "configs" / "mosquitto-fleet.acl"


def fleet_broker_conf(port: int, pki: TestPKI, acl: Path = ACL_FILE,
                      message_size_limit: int = 16 * 1024 * 1024) -> str:
    """Extra Mosquitto config: a mutual-TLS listener with the shipped ACL (as in mosquitto-fleet.conf)."""
    server = pki.server()
    return "\n".join([
        f"listener {port} 127.0.0.1",
        f"cafile {pki.ca}",
        f"certfile {server.cert}",
        f"keyfile {server.key}",
        "require_certificate true",
        "use_identity_as_username true",
        f"acl_file {acl}",
        f"message_size_limit {message_size_limit}",
    ]) + "\n"
