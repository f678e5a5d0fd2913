"""Boots as small integers: rows keyed by the boot clock store a number, not a 36-character boot id."""

from __future__ import annotations

import sqlite3

from agent.clock import Stamp


def boot_number(conn: sqlite3.Connection, stamp: Stamp) -> int:
    """The number of ``stamp``'s boot, registering it on first sight (call inside a write job).

    Not cached: a number handed out by a job that is then rolled back would point nowhere.
    """
    row = conn.execute("SELECT seq FROM boots WHERE boot_id = ?", (stamp.boot_id,)).fetchone()
    if row is not None:
        return int(row[0])
    cur = conn.execute("INSERT INTO boots (boot_id, first_wall, first_mono) VALUES (?, ?, ?)",
                       (stamp.boot_id, stamp.wall, stamp.mono))
    return int(cur.lastrowid or 0)


def boot_ids(conn: sqlite3.Connection) -> dict[int, str]:
    return {int(s): str(b) for s, b in conn.execute("SELECT seq, boot_id FROM boots")}
