"""Time that survives clock jumps: every record carries wall time *and* (boot id, boot-time offset).

Gateways without an RTC boot at 1970 and are corrected later; NTP can step the clock either way.
Within one boot, ``CLOCK_BOOTTIME`` (monotonic, counts suspend) orders events and measures ages
correctly whatever the wall clock does; across boots, the wall time is the best we have.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@cache
def boot_id() -> str:
    """The kernel's id of this boot (changes on every reboot)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return f"process-{uuid.uuid4()}"


def boot_time() -> float:
    """Seconds since boot, monotonic, including suspend."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Stamp:
    wall: float
    boot_id: str
    mono: float


def now() -> Stamp:
    return Stamp(wall=time.time(), boot_id=boot_id(), mono=boot_time())
