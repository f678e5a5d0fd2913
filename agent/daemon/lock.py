"""The state-dir lock: one daemon per state dir, and a liveness probe that needs no daemon reply.

The daemon holds an exclusive ``flock`` on ``<state_dir>/agent.lock`` for its whole life; the kernel
releases it when the process dies, however it dies. ``status`` probes it with a shared, non-blocking
lock on a read-only descriptor, so it never waits and never needs write access.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import AgentError

LOCK_NAME = "agent.lock"


class AlreadyRunning(AgentError):
    code = "already_running"


class StateLock:
    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
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
