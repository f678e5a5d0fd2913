"""The bounded audit trail: every decision counted, the ones an auditor needs kept in full.

At 600 gate decisions per second no disk holds a month of full records, and most of them are the
same answer to the same question again. So each decision is *classified* before it is stored
(``docs/operating.md`` states the guarantees, ``docs/design.md`` the data model):

- kept in full, with the exact input the policy saw: a policy error or deadline hit (``error``); a
  *transition* of its subject, i.e. a different outcome or a modify that changed different fields
  than last time (``transition``; a subject's first decision is one); any decision of a policy
  version in its first window (``new_version``); the first decision of its key — (policy, version,
  subject, outcome, reason) — in the current window (``exemplar``);
- otherwise *rolled up*: counted in the window's aggregate of its key, with the first and last time
  and a multiset digest of the inputs.

Both go into the same write job as the decision itself (the pipeline's persist job), so a decision
is counted exactly when it is committed, which is also exactly when it may act on the world. The
classification runs on the loop against *committed* state only: the in-memory view (last outcome
per subject, which keys already have an exemplar in the window, known key ids) is updated after the
commit returns, so a rolled-back job can never leave it ahead of the database.

Windows are counted on the boot clock (``CLOCK_BOOTTIME``): window ``i`` of a boot covers boot-clock
seconds ``[i*W, (i+1)*W)``, so a wall-clock step neither splits nor merges them. The outbox service
seals finished windows into the outbox (``agent/sync/auditwin.py``).
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sqlite_utils

from agent.clock import Stamp
from agent.config.pipeline import AuditSettings
from agent.storage.boots import boot_number

#: Digest lanes are sums modulo this prime (2^61 - 1): two lanes of a sum stay below 2^62, so
#: SQLite adds them in 64-bit integers without overflow.
P61 = (1 << 61) - 1

Key = tuple[str, int, str, str, str]  # (policy, version, subject, outcome, reason)

ERROR = "error"
TRANSITION = "transition"
NEW_VERSION = "new_version"
EXEMPLAR = "exemplar"
ALL = "all"  # [audit] compact = false: every decision kept


def input_digest(data: bytes) -> tuple[int, int]:
    """The two digest lanes of one input (BLAKE2b-128 split in two 64-bit halves, reduced mod P61)."""
    h = hashlib.blake2b(data, digest_size=16).digest()
    return int.from_bytes(h[:8], "big") % P61, int.from_bytes(h[8:], "big") % P61


def digest_hex(d1: int, d2: int) -> str:
    return f"{d1 % P61:016x}{d2 % P61:016x}"


def digest_of(inputs: Iterable[bytes]) -> str:
    """What a consumer computes over replayed inputs to check a window aggregate's ``digest``."""
    a = b = 0
    for data in inputs:
        x, y = input_digest(data)
        a, b = (a + x) % P61, (b + y) % P61
    return digest_hex(a, b)


def modification(requested: Any, final: Any, path: str = "") -> list[str]:
    """What a modify changed: sorted ``removed:path`` / ``changed:path`` / ``added:path`` entries.

    The *set of fields* is the signature, not their values: a clamp that keeps clamping the same field
    to different values is the same modification; clamping another field, or no longer masking one, is not.
    """
    if isinstance(requested, dict) and isinstance(final, dict):
        out: list[str] = []
        for k in requested.keys() | final.keys():
            sub = f"{path}.{k}" if path else str(k)
            if k not in final:
                out.append(f"removed:{sub}")
            elif k not in requested:
                out.append(f"added:{sub}")
            else:
                out.extend(modification(requested[k], final[k], sub))
        return sorted(out)
    if requested == final and type(requested) is type(final):
        return []
    return [f"changed:{path}"]


def signature(outcome: str, requested: Any, final: Any) -> str:
    return ",".join(modification(requested, final)) if outcome == "modify" else ""


@dataclass
class Entry:
    """One decision as the audit trail sees it."""

    key: Key
    kept: str  # "" = rolled up
    d1: int = 0
    d2: int = 0


@dataclass
class Plan:
    """The audit part of one persist job, prepared on the loop."""

    stamp: Stamp
    window: tuple[str, float, int]  # (boot id, width, index)
    entries: list[Entry] = field(default_factory=list)
    subjects: dict[str, tuple[str, str]] = field(default_factory=dict)  # transitions: subject → state
    new_policies: set[tuple[str, int]] = field(default_factory=set)
    exemplars: set[Key] = field(default_factory=set)


@dataclass
class Written:
    window_id: int
    key_ids: dict[Key, int]


class AuditLog:
    """Classifies decisions and writes their counts; one per pipeline."""

    def __init__(self, settings: AuditSettings) -> None:
        self.settings = settings
        self._subjects: dict[str, tuple[str, str]] = {}
        self._policies: dict[tuple[str, int], tuple[str, float]] = {}  # first decision: (boot id, mono)
        self._key_ids: dict[Key, int] = {}
        self._window: tuple[str, float, int] | None = None
        self._window_id = 0
        self._exemplars: set[Key] = set()
        self.loaded = False
        self.counts = {"full": 0, "rolled": 0}

    # ------------------------------------------------------------------ start-up

    def load_job(self) -> Callable[[sqlite_utils.Database], None]:
        """Read the committed state (last outcome per subject, policies' first decisions, the open
        windows' exemplars) so transitions and exemplars are judged the same across restarts."""
        def job(db: sqlite_utils.Database) -> None:
            conn = db.conn
            self._subjects = {str(s): (str(o), str(g)) for s, o, g in conn.execute(
                "SELECT subject, outcome, signature FROM audit_subjects ORDER BY wall DESC LIMIT ?",
                (self.settings.subjects_max,))}
            self._policies = {(str(p), int(v)): (str(b), float(m)) for p, v, b, m in conn.execute(
                "SELECT p.policy, p.version, b.boot_id, p.mono FROM audit_policies p JOIN boots b ON b.seq = p.boot")}
            row = conn.execute("SELECT w.id, b.boot_id, w.width_s, w.idx FROM audit_windows w JOIN boots b "
                               "ON b.seq = w.boot WHERE w.state = 0 ORDER BY w.id DESC LIMIT 1").fetchone()
            if row is not None:
                self._window_id = int(row[0])
                self._window = (str(row[1]), float(row[2]), int(row[3]))
                self._exemplars = {(str(p), int(v), str(s), str(o), str(r)) for p, v, s, o, r in conn.execute(
                    "SELECT k.policy, k.version, k.subject, k.outcome, k.reason FROM audit_rollups r "
                    "JOIN audit_keys k ON k.id = r.key WHERE r.win = ? AND r.full > 0", (self._window_id,))}
            self.loaded = True
        return job

    # ------------------------------------------------------------------ on the loop, before the job

    def window_of(self, stamp: Stamp) -> tuple[str, float, int]:
        width = float(self.settings.window_s)
        return (stamp.boot_id, width, int(stamp.mono // width))

    def plan(self, stamp: Stamp, decisions: Iterable[tuple[Key, bool, str, bytes]]) -> Plan:
        """Classify ``(key, error, modification signature, input bytes)`` of one module output's decisions."""
        window = self.window_of(stamp)
        plan = Plan(stamp, window)
        exemplars = self._exemplars if window == self._window else set()
        width = window[1]
        for key, error, sig, data in decisions:
            policy, version, subject, outcome, _reason = key
            state = (outcome, sig)
            prev = plan.subjects.get(subject) or self._subjects.get(subject)
            ident = (policy, version)
            first = self._policies.get(ident)
            if first is None and ident not in plan.new_policies:
                plan.new_policies.add(ident)
                fresh = True
            elif first is None:
                fresh = True
            else:
                fresh = first[0] == stamp.boot_id and stamp.mono - first[1] < width
            if error:
                kept = ERROR
            elif prev != state:
                kept = TRANSITION
            elif fresh:
                kept = NEW_VERSION
            elif key not in exemplars and key not in plan.exemplars:
                kept = EXEMPLAR
            elif not self.settings.compact:
                kept = ALL
            else:
                kept = ""
            if prev != state:
                plan.subjects[subject] = state
            entry = Entry(key, kept)
            if kept:
                plan.exemplars.add(key)
            else:
                entry.d1, entry.d2 = input_digest(data)
            plan.entries.append(entry)
        return plan

    # ------------------------------------------------------------------ inside the persist job

    def window_row(self, conn: sqlite3.Connection, plan: Plan) -> int:
        """The id of ``plan``'s window (created on first use); the full records carry it."""
        st = plan.stamp
        boot = boot_number(conn, st)
        _, width, idx = plan.window
        # a window sealed meanwhile (a late job) is reopened as its next part: nothing is ever
        # counted into a window whose document already left
        return int(conn.execute(
            "INSERT INTO audit_windows (boot, width_s, idx, first_wall, first_mono, last_wall, last_mono) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(boot, width_s, idx) DO UPDATE SET "
            "part = part + (state = 1), state = 0, last_wall = excluded.last_wall, "
            "last_mono = max(last_mono, excluded.last_mono) RETURNING id",
            (boot, width, idx, st.wall, st.mono, st.wall, st.mono)).fetchone()[0])

    def write(self, conn: sqlite3.Connection, plan: Plan, win: int, decision_ids: list[int]) -> Written:
        """Count every decision of ``plan`` in window ``win``; ``decision_ids`` are the full records' row
        ids (0 for rolled-up decisions), in the order of ``plan.entries``."""
        st = plan.stamp
        key_ids: dict[Key, int] = {}
        agg: dict[Key, list[int]] = {}
        for entry in plan.entries:
            a = agg.get(entry.key)
            if a is None:
                a = agg[entry.key] = [0, 0, 0, 0]
            if entry.kept:
                a[0] += 1
            else:
                a[1] += 1
                a[2] = (a[2] + entry.d1) % P61
                a[3] = (a[3] + entry.d2) % P61
        for key, (full, rolled, d1, d2) in agg.items():
            kid = self._key_ids.get(key)
            if kid is None:
                kid = int(conn.execute(
                    "INSERT INTO audit_keys (policy, version, subject, outcome, reason) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(policy, version, subject, outcome, reason) DO UPDATE SET policy = policy "
                    "RETURNING id", key).fetchone()[0])
            key_ids[key] = kid
            conn.execute(
                "INSERT INTO audit_rollups (win, key, full, rolled, first_wall, first_mono, last_wall, last_mono, "
                "d1, d2) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(win, key) DO UPDATE SET "
                "full = full + excluded.full, rolled = rolled + excluded.rolled, last_wall = excluded.last_wall, "
                "last_mono = excluded.last_mono, d1 = (d1 + excluded.d1) % 2305843009213693951, "
                "d2 = (d2 + excluded.d2) % 2305843009213693951",
                (win, kid, full, rolled, st.wall, st.mono, st.wall, st.mono, d1, d2))
        last_id = {entry.key[2]: rid for entry, rid in zip(plan.entries, decision_ids, strict=True)}
        for subject, (outcome, sig) in plan.subjects.items():
            decision = last_id.get(subject, 0)
            conn.execute("INSERT INTO audit_subjects (subject, outcome, signature, decision, wall) VALUES "
                         "(?, ?, ?, ?, ?) ON CONFLICT(subject) DO UPDATE SET outcome = excluded.outcome, "
                         "signature = excluded.signature, decision = excluded.decision, wall = excluded.wall",
                         (subject, outcome, sig, decision, st.wall))
        if plan.new_policies:
            boot = boot_number(conn, st)
            for policy, version in plan.new_policies:
                conn.execute("INSERT OR IGNORE INTO audit_policies (policy, version, boot, mono, wall) "
                             "VALUES (?, ?, ?, ?, ?)", (policy, version, boot, st.mono, st.wall))
        return Written(win, key_ids)

    # ------------------------------------------------------------------ on the loop, after the commit

    def committed(self, plan: Plan, written: Written) -> None:
        if plan.window != self._window:
            self._window = plan.window
            self._exemplars = set()
        self._window_id = written.window_id
        self._exemplars |= plan.exemplars
        self._subjects.update(plan.subjects)
        if len(self._subjects) > self.settings.subjects_max:
            for subject in list(self._subjects)[: len(self._subjects) - self.settings.subjects_max]:
                del self._subjects[subject]  # forgotten: its next decision is kept in full
        for ident in plan.new_policies:
            self._policies.setdefault(ident, (plan.stamp.boot_id, plan.stamp.mono))
        if len(self._key_ids) > 200_000:
            self._key_ids.clear()
        self._key_ids.update(written.key_ids)
        for entry in plan.entries:
            self.counts["full" if entry.kept else "rolled"] += 1
