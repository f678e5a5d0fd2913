"""Agent processes started by tests: real subprocesses, always killed by pid at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from agent_devkit import REPO


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "agent", *args]


def run_agent(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
              input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run an ``edge-agent`` command to completion (status, install, trust, policy eval, …)."""
    return subprocess.run(agent_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO, input=input)


def run_fleet(*args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from agent.cli.fleet_main import main; raise SystemExit(main())",
                           *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, input=input)


def status_json(state_dir: Path, config: Path | None = None) -> tuple[int, dict[str, object]]:
    args = ["status", "--json", "--state-dir", str(state_dir)]
    if config is not None:
        args += ["--config", str(config)]
    proc = run_agent(*args)
    return proc.returncode, json.loads(proc.stdout)


class NotifySocket:
    """A real unix datagram socket standing in for systemd's ``$NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        for msg in self.messages:
            if needle in msg.split("\n"):
                return msg
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536).decode()
            except TimeoutError:
                break
            self.messages.append(data)
            if needle in data.split("\n"):
                return data
        raise AssertionError(f"no {needle!r} within {timeout}s; got {self.messages!r}")

    def wait_for_status(self, *parts: str, timeout: float = 30.0) -> str:
        """The first ``STATUS=`` line that contains every one of ``parts`` (e.g. ``"modules: 1 loaded"``)."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for msg in self.messages[seen:]:
                for line in msg.split("\n"):
                    if line.startswith("STATUS=") and all(p in line for p in parts):
                        return line
            seen = len(self.messages)
            if time.monotonic() >= deadline:
                raise AssertionError(f"no STATUS= with {parts!r} within {timeout}s; got {self.messages[-5:]!r}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(65536).decode())

    def drain(self) -> None:
        """Collect datagrams already queued (e.g. STOPPING=1 after the process exited)."""
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


class AgentProcess:
    """``edge-agent run`` as a child process with its own notify socket."""

    def __init__(self, state_dir: Path, config: Path | None = None, extra_env: dict[str, str] | None = None,
                 args: Sequence[str] = ()) -> None:
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        # unix socket paths are limited to 108 bytes: keep it short, outside pytest's deep tmp dirs
        self.notify = NotifySocket(Path(tempfile.mkdtemp(prefix="ea-")) / "notify.sock")
        cmd = agent_cmd("run", "--state-dir", str(state_dir), *args)
        if config is not None:
            cmd += ["--config", str(config)]
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), **(extra_env or {})}
        self.log_path = state_dir.parent / f"agent-{id(self)}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)
        self._closed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 60.0) -> str:
        try:
            return self.notify.wait_for("READY=1", timeout)
        except AssertionError:
            raise AssertionError(f"agent not READY; log:\n{self.output()}") from None

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the exit while reading the notify socket, as systemd does (its queue holds
        ~10 datagrams: the daemon's last words, STOPPING=1 among them, must find room)."""
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.notify.drain()
                try:
                    return self.proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    if time.monotonic() > deadline:
                        raise
        finally:
            self.close()

    def kill(self) -> int:
        self.signal(signal.SIGKILL)
        code = self.proc.wait(30)
        self.close()
        return code

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc.poll() is None:
            self.signal(signal.SIGKILL)
            self.proc.wait(30)
        self._log.close()
        self.notify.drain()
        self.notify.close()
        shutil.rmtree(self.notify.path.parent, ignore_errors=True)


@contextlib.contextmanager
def agent_process(state_dir: Path, config: Path | None = None, **kw: object) -> Iterator[AgentProcess]:
    proc = AgentProcess(state_dir, config, **kw)  # type: ignore[arg-type]
    try:
        yield proc
    finally:
        proc.close()
