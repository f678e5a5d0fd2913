"""Time that survives clock jumps: every record carries wall time *and* (boot id, boot-time offset).

Gateways without an RTC boot at 1970 and are corrected later; NTP can step the clock either way.
Within one boot, ``CLOCK_BOOTTIME`` (monotonic, counts suspend) orders events and measures ages
correctly whatever the wall clock does; across boots, the wall time is the best we have.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
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


# --- ages and ordering that survive clock jumps (used by the outbox's TTLs and the drain) ---

#: Before this wall time (2020-01-01) the clock is treated as "not set yet" (no RTC, no NTP).
PLAUSIBLE_WALL = 1_577_836_800.0

Clock = Callable[[], Stamp]


def wall_plausible(wall: float) -> bool:
    return wall >= PLAUSIBLE_WALL


@dataclass(frozen=True)
class BootSpan:
    """What we last knew of an earlier boot: its id and one (wall, mono) pair taken near its end."""

    boot_id: str
    last_wall: float
    last_mono: float


def downtime(prev: BootSpan, now: Stamp) -> float:
    """Lower bound of the time between ``prev``'s last sign of life and the start of the current boot.

    Uses the wall clock only when both ends look set; otherwise 0: a record then looks *younger*
    than it is, so a TTL can expire late but never early because of a wrong clock.
    """
    if not (wall_plausible(prev.last_wall) and wall_plausible(now.wall)):
        return 0.0
    this_boot_started = now.wall - now.mono
    return max(0.0, this_boot_started - prev.last_wall)


def age(record: Stamp, now: Stamp, boots: dict[str, BootSpan]) -> float:
    """Seconds since ``record`` was stamped, from monotonic time whenever possible.

    Same boot: exact (``CLOCK_BOOTTIME``), whatever the wall clock did. Earlier boot: the time it
    still ran after the record, plus a lower bound of the downtime, plus the current boot's uptime.
    Unknown boot: the wall difference if both walls look set, else 0.
    """
    if record.boot_id == now.boot_id:
        return max(0.0, now.mono - record.mono)
    span = boots.get(record.boot_id)
    if span is None:
        if wall_plausible(record.wall) and wall_plausible(now.wall):
            return max(0.0, now.wall - record.wall)
        return 0.0
    return max(0.0, span.last_mono - record.mono) + downtime(span, now) + now.mono


def best_wall(record: Stamp, now: Stamp) -> float | None:
    """The record's wall time as best known *now*: re-derived from monotonic time in the same boot
    (fixes records stamped before NTP corrected a 1970 clock); ``None`` if no plausible wall exists."""
    if record.boot_id == now.boot_id and wall_plausible(now.wall):
        return now.wall - (now.mono - record.mono)
    return record.wall if wall_plausible(record.wall) else None


def iso(ts: float | None) -> str | None:
    """RFC 3339 UTC with a ``Z`` (what ``status`` and reports show); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
