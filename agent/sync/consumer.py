"""A reference consumer of the outbox format v2: rebuilds per-interval decision counts and checks them.

What the cloud side has to do with the audit trail, written once so tests, benchmarks and integrators
share it (``docs/design.md``): de-duplicate records by key, sum ``full + rolled`` per key over the
``audit_window`` documents, check that each document carries exactly ``full`` records per key, and
collect the gap records.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, int, str, str, str]


def key_of(item: dict[str, Any]) -> Key:
    return (str(item["policy"]), int(item["version"]), str(item["subject"]), str(item["outcome"]),
            str(item["reason"]))


@dataclass
class AuditTally:
    made: Counter[Key] = field(default_factory=Counter)  # decisions per key, over every window received
    full: Counter[Key] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)  # full records by why they were kept
    windows: int = 0
    gaps: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)

    def add(self, key: str, payload: dict[str, Any]) -> None:
        """One delivered record (call once per key: de-duplicate first, or let this do it)."""
        if key in self.keys:
            return
        self.keys.add(key)
        kind = payload.get("type")
        if kind == "gap":
            self.gaps.append(payload)
            return
        if kind != "audit_window":
            return
        self.windows += 1
        per_key = Counter(key_of(r) for r in payload["records"])
        for c in payload["counts"]:
            k = key_of(c)
            self.made[k] += int(c["full"]) + int(c["rolled"])
            self.full[k] += int(c["full"])
            if per_key.get(k, 0) != int(c["full"]):
                self.problems.append(f"{key}: {k} says full={c['full']} but carries {per_key.get(k, 0)} records")
        counted = {key_of(c) for c in payload["counts"]}
        for r in payload["records"]:
            self.kept[str(r["kept"])] += 1
            if key_of(r) not in counted:
                self.problems.append(f"{key}: record {r['id']} has no count")

    @property
    def total(self) -> int:
        return sum(self.made.values())
