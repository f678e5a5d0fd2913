"""Trusted time = max(system clock, persisted last-known-good time).

A gateway without an RTC boots at 1970; an attacker may set the clock back to replay an expired
release. Time checks therefore never use a clock earlier than the latest time this agent has already
seen and persisted, and a clock reset never expires (or wipes) what is installed.

The persisted time only moves forward in bounded steps. A clock set far into the future once (a bad
RTC, a wrong manual ``date``, a broken time server) must not be remembered as "good": it would make
trusted time stay in the future for ever and every release with an ``expires`` would be refused long
before its time. So the stored value only advances by what this process can vouch for:

- the daemon's later persists: by the time it *measured* on its monotonic clock since its previous
  persist, times ``1 + CATCH_UP_RATE``, + ``ELAPSED_SLACK_S`` for clock slewing — a wrong clock that
  stays wrong for D days gains the floor only D/10 extra days, and a floor left behind (after a long
  power-off) catches up 2.4 h per day of uptime;
- a persist with nothing measured (the daemon's first after start, a one-shot ``install``): by at
  most ``MAX_FORWARD_STEP_S`` (one day).

A correct clock after a long power-off is still used at once (trusted time is ``max(system, stored)``);
only the stored floor catches up (a day per restart/install, 10 % faster than real time while
running). The very first value is taken as it is (there is nothing to compare it with).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import sqlite_utils

LAST_GOOD_KEY = "last_good_time"
MAX_FORWARD_STEP_S = 86400.0
"""How far one persist with no measured elapsed time may move the stored value forward."""
CATCH_UP_RATE = 0.1
"""How much faster than measured time the stored value may move (so a lagging floor catches up)."""
ELAPSED_SLACK_S = 60.0
"""Added to a measured elapsed time (NTP slewing, the persist's own latency)."""


def last_good_time(conn: sqlite3.Connection) -> float:
    row = conn.execute("SELECT value FROM trust_state WHERE key = ?", (LAST_GOOD_KEY,)).fetchone()
    return float(row[0]) if row else 0.0


def trusted_now(conn: sqlite3.Connection, system_now: float | None = None) -> float:
    now = time.time() if system_now is None else system_now
    return max(now, last_good_time(conn))


def advance_job(system_now: float | None = None,
                elapsed_s: float | None = None) -> Callable[[sqlite_utils.Database], float]:
    """Writer job: persist the system clock as last-known-good time, never backwards and never further
    ahead of the stored value than this process can vouch for; returns the stored value.

    ``elapsed_s``: monotonic time this process measured since its own previous persist; None when
    nothing was measured (then one ``MAX_FORWARD_STEP_S`` step is allowed).
    """
    allowance = MAX_FORWARD_STEP_S if elapsed_s is None else max(0.0, elapsed_s) * (1 + CATCH_UP_RATE) + ELAPSED_SLACK_S

    def job(db: sqlite_utils.Database) -> float:
        now = time.time() if system_now is None else system_now
        db.execute("INSERT INTO trust_state (key, value, updated_at) VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE "
                   "SET value = CAST(max(CAST(value AS REAL), min(CAST(excluded.value AS REAL), "
                   "CAST(value AS REAL) + ?)) AS TEXT), updated_at = excluded.updated_at",
                   (LAST_GOOD_KEY, repr(now), now, allowance))
        stored = last_good_time(db.conn)
        if now > stored:
            from agent.logs import get_logger
            get_logger("trust").warning("trusted_time_step_limited", system_time=now, stored=stored,
                                        ahead_s=round(now - stored, 1), max_step_s=allowance)
        return stored
    return job
