"""The state-dir lock: one daemon per state dir, and a liveness probe that needs no daemon reply.

The daemon holds an exclusive ``flock`` on ``<state_dir>/agent.lock`` for its whole life; the kernel
releases it when the process dies, however it dies. ``status`` probes it with a shared, non-blocking
lock on a read-only descriptor, so it never waits and never needs write access.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from agent.errors import AgentError

LOCK_NAME = "agent.lock"


class AlreadyRunning(AgentError):
    code = "already_running"


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self, grace_s: float = 2.0) -> None:
        """Take the lock or raise :class:`AlreadyRunning`.

        ``status`` probes hold a shared lock for a moment; retrying for ``grace_s`` keeps a probe that
        happens to run at start-up from being mistaken for a second daemon.
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        deadline = time.monotonic() + grace_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                raise AlreadyRunning(
                    f"another edge-agent already runs with state dir {self.path.parent}; "
                    "stop it first or use a different --state-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def daemon_holds_lock(state_dir: Path) -> bool:
    """True if a live process holds the state-dir lock (i.e. a daemon is running)."""
    path = state_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def lock_pid(state_dir: Path) -> int | None:
    """The pid the current (or last) lock holder wrote into the lock file, if readable."""
    try:
        text = (state_dir / LOCK_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
