"""The active Policy per name, swapped atomically, with health counters for the fleet component.

Why a registry of references: a hot swap must never drop or split an evaluation. Callers fetch the
current :class:`Policy` once per decision (``registry.get(name)``) and evaluate on that object; a
``swap`` replaces the reference under a lock, so evaluations already in flight finish on the old
version while new ones use the new version. Health counters live on each Policy (``PolicyStats``),
so the fleet component can compare a candidate against the version it replaced.
"""

from __future__ import annotations

import threading
from typing import Any

from agent.logs import get_logger
from agent.policy.engine import Policy

log = get_logger("policy")


class PolicyRegistry:
    """Name → active Policy. Thread-safe; reads are a dict lookup (no lock on the hot path)."""

    def __init__(self) -> None:
        self._active: dict[str, Policy] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Policy | None:
        return self._active.get(name)

    def names(self) -> list[str]:
        return sorted(self._active)

    def swap(self, name: str, new: Policy) -> Policy | None:
        """Install ``new`` as the active policy ``name``; return the one it replaced (or None)."""
        with self._lock:
            old = self._active.get(name)
            active = dict(self._active)
            active[name] = new
            self._active = active  # one reference assignment: readers see old or new, never a mix
        log.info("policy_swapped", policy=name, version=new.version,
                 previous=old.version if old is not None else None)
        return old

    def remove(self, name: str) -> Policy | None:
        with self._lock:
            active = dict(self._active)
            old = active.pop(name, None)
            self._active = active
        return old

    def health(self, name: str) -> dict[str, Any] | None:
        """Counters of the active version: evals, errors, traps, deadline hits, latency histogram."""
        policy = self._active.get(name)
        if policy is None:
            return None
        return {"name": name, "version": policy.version, "sha256": policy.sha256, **policy.stats.snapshot()}

    def health_all(self) -> list[dict[str, Any]]:
        return [h for n in self.names() if (h := self.health(n)) is not None]
