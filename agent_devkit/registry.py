"""A real OCI registry (Debian's ``docker-registry``: CNCF distribution 2.8) on a free loopback port.

Started and stopped by pid, like the test brokers. Options: TLS (a certificate from
:class:`agent_devkit.tls.TestPKI`), basic auth (an htpasswd file with bcrypt entries, made by
``htpasswd`` from apache2-utils: distribution only accepts bcrypt), and pull-through cache mode
(``proxy.remoteurl``: the registry then mirrors another one, as a site cache would), and bearer
tokens from :class:`TokenServer` (the distribution spec's token flow).
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_devkit.broker import free_port

REGISTRY = shutil.which("docker-registry") or "/usr/bin/docker-registry"
HTPASSWD = shutil.which("htpasswd") or "/usr/bin/htpasswd"


def htpasswd_file(path: Path, users: dict[str, str]) -> Path:
    """bcrypt entries (``htpasswd -B``), the only kind distribution's htpasswd auth accepts."""
    lines = []
    for user, password in users.items():
        out = subprocess.run([HTPASSWD, "-nbB", user, password], capture_output=True, text=True, check=True)
        lines.append(out.stdout.strip())
    path.write_text("\n".join(lines) + "\n")
    return path


class TokenServer:
    """A bearer-token issuer as the distribution spec's token flow expects: the registry answers 401 with
    ``Bearer realm=…,service=…,scope=…``; the client gets a JWT here with its user and password. Signed
    ES256 with an ``x5c`` header whose certificate the registry trusts (``rootcertbundle``)."""

    def __init__(self, workdir: Path, users: dict[str, str], service: str = "edge-test-registry",
                 issuer: str = "edge-test-issuer") -> None:
        import datetime as dt

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users, self.service, self.issuer = users, service, issuer
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-test token issuer")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(hours=1))
                .not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        workdir.mkdir(parents=True, exist_ok=True)
        self.cert_pem = workdir / "token-issuer.pem"
        self.cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.x5c = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                auth = self.headers.get("Authorization", "")
                user = ""
                if auth.startswith("Basic "):
                    u, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if server.users.get(u) != pw:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = u
                body = json.dumps({"token": server.token(user, query.get("scope", []))}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def token(self, user: str, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                if kind == "repository" and user:  # anonymous users get a token that grants nothing
                    access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": user, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        header = {"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]}

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        self.issued += 1
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Registry:
    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None, htpasswd: Path | None = None,
                 proxy_url: str = "", proxy_user: str = "", proxy_password: str = "",
                 token: TokenServer | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.htpasswd = htpasswd
        self.proxy_url = proxy_url
        self.proxy_user = proxy_user
        self.proxy_password = proxy_password
        self.token = token
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "config.yml"
        self.log = workdir / "registry.log"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}"

    def _write_conf(self) -> None:
        lines = [
            "version: 0.1",
            "log:",
            "  level: warn",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  cache:",
            "    blobdescriptor: inmemory",  # as Debian's packaged config: no disk round trip per blob stat
            "  filesystem:",
            f"    rootdirectory: {self.workdir / 'data'}",
            "  delete:",
            "    enabled: true",
            "http:",
            f"  addr: {self.address}",
            f"  secret: edge-agent-test-{self.port}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self.tls[0]}", f"    key: {self.tls[1]}"]
        if self.htpasswd:
            lines += ["auth:", "  htpasswd:", "    realm: edge-agent-test", f"    path: {self.htpasswd}"]
        elif self.token is not None:
            lines += ["auth:", "  token:", f"    realm: {self.token.realm}", f"    service: {self.token.service}",
                      f"    issuer: {self.token.issuer}", f"    rootcertbundle: {self.token.cert_pem}"]
        if self.proxy_url:
            lines += ["proxy:", f"  remoteurl: {self.proxy_url}"]
            if self.proxy_user:
                lines += [f"  username: {self.proxy_user}", f"  password: {self.proxy_password}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 15.0) -> Registry:
        self._write_conf()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([REGISTRY, "serve", str(self.conf)], stdout=log, stderr=log,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                if self._answers():
                    return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not answer on {self.address} within {timeout}s")

    def _answers(self) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1, context=ctx if self.tls else None):
                return True
        except urllib.error.HTTPError:
            return True  # 401 with auth: it answers
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def running_registry(workdir: Path, **kwargs: object) -> Iterator[Registry]:
    reg = Registry(workdir, **kwargs)  # type: ignore[arg-type]
    reg.start()
    try:
        yield reg
    finally:
        reg.stop(signal.SIGKILL)
