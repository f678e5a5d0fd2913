"""A real OCI registry (Debian's ``docker-registry``: CNCF distribution 2.8) on a free loopback port.

Started and stopped by pid, like the test brokers. Options: TLS (a certificate from
:class:`agent_devkit.tls.TestPKI`), basic auth (an htpasswd file with bcrypt entries, made by
``htpasswd`` from apache2-utils: distribution only accepts bcrypt), and pull-through cache mode
(``proxy.remoteurl``: the registry then mirrors another one, as a site cache would).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

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


class Registry:
    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None, htpasswd: Path | None = None,
                 proxy_url: str = "", proxy_user: str = "", proxy_password: str = "") -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.htpasswd = htpasswd
        self.proxy_url = proxy_url
        self.proxy_user = proxy_user
        self.proxy_password = proxy_password
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
