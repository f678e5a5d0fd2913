"""systemd's notify protocol: one datagram per message to ``$NOTIFY_SOCKET``.

Written here rather than taken from ``sdnotify`` because that package swallows every error and has
no wheel; the protocol is a few lines. Without ``$NOTIFY_SOCKET`` (not under systemd) it is a no-op.
"""

from __future__ import annotations

import os
import socket
import time

from agent.logs import get_logger

log = get_logger("daemon")

ONCE_ONLY_ATTEMPTS = 50
ONCE_ONLY_RETRY_S = 0.02


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr:
            # an abstract socket is written with a leading '@' and sent with a leading NUL
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self.dropped = 0  # messages not sent because the socket's queue was full

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def send(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # Never wait for room: a notify socket nobody drains (a busy service manager; the queue holds
        # about 10 datagrams) must not freeze the event loop. A lost WATCHDOG=1 or STATUS= is replaced
        # by the next one; READY=1, RELOADING=1 and STOPPING=1 are sent once each, so they get a few
        # short retries (a bounded second) before they are given up.
        data = "\n".join(fields).encode()
        attempts = 1 if all(f.startswith(("WATCHDOG=", "STATUS=")) for f in fields) else ONCE_ONLY_ATTEMPTS
        for attempt in range(attempts):
            try:
                self._sock.sendto(data, socket.MSG_DONTWAIT, self._addr)
                return True
            except BlockingIOError:
                if attempt + 1 < attempts:
                    time.sleep(ONCE_ONLY_RETRY_S)
            except OSError as exc:
                log.warning("sd_notify_failed", error=str(exc))
                return False
        self.dropped += 1
        if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0 or attempts > 1:
            log.warning("sd_notify_dropped", dropped=self.dropped, fields=[f.split("=", 1)[0] for f in fields])
        return False

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def reloading(self) -> None:
        # systemd ≥ 253 wants the CLOCK_MONOTONIC time of the reload request with RELOADING=1
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if systemd asked for watchdog pings for this pid."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None
