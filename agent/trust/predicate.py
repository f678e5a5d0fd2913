"""The release predicate ``urn:edge-agent:release:v1``: what the signed statement says about the bytes.

Every field is documented in docs/fleet.md ("The predicate"). Unknown extra fields are kept
in ``raw`` so a newer fleet tool can add metadata without breaking older agents.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from agent.jsonsafe import INT_MAX
from agent.trust.errors import MalformedPredicate, VersionOutOfRange

RELEASE_PREDICATE_TYPE = "urn:edge-agent:release:v1"
KINDS: tuple[str, ...] = ("module", "policy")
Kind = Literal["module", "policy"]
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_VERSION = INT_MAX  # versions are stored (floors, releases) as SQLite's signed 64-bit integers
_VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}$")


@dataclass(frozen=True)
class ReleasePredicate:
    kind: str
    name: str
    version: int
    entrypoints: tuple[str, ...] = ()
    trigger: dict[str, Any] | None = None
    limits: dict[str, float] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    not_before: float | None = None
    expires: float | None = None
    min_agent_version: str | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def targets_node(self, node_id: str) -> bool:
        """True if the release is meant for ``node_id`` (no targets = every node)."""
        return not self.targets or any(fnmatch.fnmatchcase(node_id, t) for t in self.targets)


def check_version(version: int, what: str) -> None:
    if version > MAX_VERSION:
        raise VersionOutOfRange(f"{what} {str(version)[:24]}{'…' if len(str(version)) > 24 else ''} is past the "
                                f"largest version a gateway can store ({MAX_VERSION}); publish a smaller version")


def parse_time(value: object, what: str) -> float:
    if not isinstance(value, str):
        raise MalformedPredicate(f"predicate.{what} must be an RFC 3339 string like 2026-01-31T00:00:00Z")
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedPredicate(f"predicate.{what} {value!r} is not an RFC 3339 time") from None
    if dt.tzinfo is None:
        raise MalformedPredicate(f"predicate.{what} {value!r} has no time zone (append Z for UTC)")
    return dt.timestamp()


def version_tuple(v: str) -> tuple[int, ...]:
    """'0.1.0' → (0, 1, 0); non-numeric suffixes (0.2.0rc1) count by their leading digits."""
    parts: list[int] = []
    for p in v.split("."):
        m = re.match(r"\d+", p)
        parts.append(int(m.group()) if m else 0)
    return tuple(parts)


def _str_list(value: object, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x for x in value):
        raise MalformedPredicate(f"predicate.{what} must be a list of non-empty strings")
    return tuple(value)


def parse_predicate(obj: object) -> ReleasePredicate:
    """Validate the predicate object; raise MalformedPredicate naming the field at fault."""
    if not isinstance(obj, dict):
        raise MalformedPredicate("the predicate must be a JSON object")
    kind = obj.get("kind")
    if kind not in KINDS:
        raise MalformedPredicate(f"predicate.kind must be one of {', '.join(KINDS)}; got {kind!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MalformedPredicate(f"predicate.name {name!r} must be 1-128 characters of letters, digits, '.', '_' "
                                 "or '-', starting with a letter or digit")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MalformedPredicate(f"predicate.version must be an integer >= 1; got {version!r}")
    check_version(version, "predicate.version")
    entrypoints = _str_list(obj.get("entrypoints", []), "entrypoints")
    trigger = obj.get("trigger")
    if trigger is not None and (not isinstance(trigger, dict) or not isinstance(trigger.get("type"), str)):
        raise MalformedPredicate("predicate.trigger must be an object with a string 'type'")
    raw_limits = obj.get("limits", {})
    if not isinstance(raw_limits, dict):
        raise MalformedPredicate("predicate.limits must be an object of numbers")
    limits: dict[str, float] = {}
    for k, v in raw_limits.items():
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise MalformedPredicate(f"predicate.limits.{k} must be a non-negative number; got {v!r}")
        limits[str(k)] = v
    targets = _str_list(obj.get("targets", []), "targets")
    not_before = parse_time(obj["not_before"], "not_before") if obj.get("not_before") is not None else None
    expires = parse_time(obj["expires"], "expires") if obj.get("expires") is not None else None
    if not_before is not None and expires is not None and expires <= not_before:
        raise MalformedPredicate("predicate.expires must be later than predicate.not_before")
    mav = obj.get("min_agent_version")
    if mav is not None and (not isinstance(mav, str) or not _VERSION_RE.match(mav)):
        raise MalformedPredicate(f"predicate.min_agent_version {mav!r} must look like 0.1.0")
    return ReleasePredicate(kind=kind, name=name, version=version, entrypoints=entrypoints, trigger=trigger,
                            limits=limits, targets=targets, not_before=not_before, expires=expires,
                            min_agent_version=mav, raw=dict(obj))
