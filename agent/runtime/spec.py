"""What a module release's predicate says about running it: trigger, readings, config, limits, permissions.

The predicate (``urn:edge-agent:release:v1``, kind ``module``) fields read here — documented in
docs/authoring.md, "What the release predicate says about running it":

- ``trigger``: ``{"type": "schedule" | "topic" | "mixed" | "manual", ...}``
  - ``schedule``: ``{"interval_s": N}`` or ``{"cron": "*/5 * * * *"}`` (5-field crontab, UTC) —
    required for types schedule and mixed;
  - ``topics``: list of MQTT topic filters (``+``/``#`` allowed) — required for types topic and mixed;
  - ``batch_window_ms``: how long matching readings are collected before one run (default from config).
- ``readings``: for scheduled runs, which stored readings to hand over:
  ``{"topics": [filters], "window_s": 300, "max": 100}`` (default: none).
- ``config``: any JSON object, passed to every run as ``config``.
- ``limits``: ``deadline_ms``, ``memory_mb``, ``stdout_bytes`` — each capped by the gateway's ``[modules]``.
- ``permissions``: ``{"filesystem": true, "env": {"NAME": "value"}}`` — granted only if the gateway's
  config allows it (``allow_filesystem`` / ``allow_env``); otherwise the module runs without them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from agent.config.modules import ModuleSettings
from agent.messaging.topics import valid_filter
from agent.runtime.contract import ModuleError

TRIGGER_TYPES = ("schedule", "topic", "mixed", "manual")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_INTERVAL_S = 366 * 86400


class ModuleSpecInvalid(ModuleError):
    """A module release's predicate does not say how to run it (the release is not loaded)."""

    code = "module_spec_invalid"


@dataclass(frozen=True)
class Schedule:
    interval_s: float | None = None
    cron: str | None = None

    def describe(self) -> str:
        return f"every {self.interval_s:g} s" if self.interval_s is not None else f"cron '{self.cron}' UTC"

    def key(self) -> str:
        """Stable text of the schedule, persisted with the last-run time (a new schedule resets it)."""
        return f"interval:{self.interval_s:g}" if self.interval_s is not None else f"cron:{self.cron}"


@dataclass(frozen=True)
class ReadingsQuery:
    topics: tuple[str, ...]
    window_s: float
    max: int


@dataclass(frozen=True)
class ModuleSpec:
    trigger_type: str
    schedule: Schedule | None = None
    topics: tuple[str, ...] = ()
    batch_window_ms: int | None = None
    readings: ReadingsQuery | None = None
    config: dict[str, Any] = field(default_factory=dict)
    deadline_ms: int | None = None
    memory_mb: int | None = None
    stdout_bytes: int | None = None
    filesystem: bool = False
    env: tuple[tuple[str, str], ...] = ()


def _topics(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise ModuleSpecInvalid(f"{where} must be a non-empty list of MQTT topic filters")
    for flt in value:
        if not valid_filter(flt):
            raise ModuleSpecInvalid(f"{where}: '{flt}' is not a valid MQTT topic filter")
    return tuple(value)


def _positive_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ModuleSpecInvalid(f"{where}.{key} must be a positive number, got {value!r}")
    return int(value)


def _schedule(raw: Any) -> Schedule:
    if not isinstance(raw, dict):
        raise ModuleSpecInvalid('trigger.schedule must be {"interval_s": N} or {"cron": "m h dom mon dow"}')
    if ("interval_s" in raw) == ("cron" in raw):
        raise ModuleSpecInvalid("trigger.schedule needs exactly one of interval_s or cron")
    if "interval_s" in raw:
        value = raw["interval_s"]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= MAX_INTERVAL_S:
            raise ModuleSpecInvalid(f"trigger.schedule.interval_s must be between 1 and {MAX_INTERVAL_S} seconds, "
                                    f"got {value!r}")
        return Schedule(interval_s=float(value))
    cron = raw["cron"]
    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise ModuleSpecInvalid(f"trigger.schedule.cron must be a 5-field crontab like '*/5 * * * *', got {cron!r}")
    from apscheduler.triggers.cron import CronTrigger

    try:
        CronTrigger.from_crontab(cron, timezone="UTC")
    except ValueError as exc:
        raise ModuleSpecInvalid(f"trigger.schedule.cron '{cron}' is not valid: {exc}") from None
    return Schedule(cron=cron)


def parse_spec(predicate: dict[str, Any]) -> ModuleSpec:
    """Read the run-related fields of a module predicate; raise :class:`ModuleSpecInvalid` naming the field."""
    trig = predicate.get("trigger") or {"type": "manual"}
    if not isinstance(trig, dict):
        raise ModuleSpecInvalid("trigger must be an object")
    ttype = trig.get("type")
    if ttype not in TRIGGER_TYPES:
        raise ModuleSpecInvalid(f"trigger.type must be one of {', '.join(TRIGGER_TYPES)}, got {ttype!r}")
    schedule = _schedule(trig.get("schedule")) if ttype in ("schedule", "mixed") else None
    topics = _topics(trig.get("topics"), "trigger.topics") if ttype in ("topic", "mixed") else ()
    window = trig.get("batch_window_ms")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= 60000):
        raise ModuleSpecInvalid(f"trigger.batch_window_ms must be an integer between 0 and 60000, got {window!r}")

    readings = None
    rq = predicate.get("readings")
    if rq is not None:
        if not isinstance(rq, dict):
            raise ModuleSpecInvalid('readings must be {"topics": [...], "window_s": N, "max": N}')
        window_s = rq.get("window_s", 300)
        if isinstance(window_s, bool) or not isinstance(window_s, int | float) or window_s <= 0:
            raise ModuleSpecInvalid(f"readings.window_s must be a positive number, got {window_s!r}")
        readings = ReadingsQuery(topics=_topics(rq.get("topics"), "readings.topics"), window_s=float(window_s),
                                 max=_positive_int(rq, "max", "readings") or 100)

    config = predicate.get("config", {})
    if not isinstance(config, dict):
        raise ModuleSpecInvalid(f"config must be a JSON object, got {type(config).__name__}")
    limits = predicate.get("limits", {}) or {}
    if not isinstance(limits, dict):
        raise ModuleSpecInvalid("limits must be an object")
    perms = predicate.get("permissions", {}) or {}
    if not isinstance(perms, dict):
        raise ModuleSpecInvalid("permissions must be an object")
    fs = perms.get("filesystem", False)
    if not isinstance(fs, bool):
        raise ModuleSpecInvalid("permissions.filesystem must be true or false")
    env_raw = perms.get("env", {})
    if not isinstance(env_raw, dict) or not all(
            isinstance(k, str) and _ENV_NAME.match(k) and isinstance(v, str) for k, v in env_raw.items()):
        raise ModuleSpecInvalid("permissions.env must be an object of NAME: \"value\" strings")
    return ModuleSpec(
        trigger_type=ttype, schedule=schedule, topics=topics, batch_window_ms=window, readings=readings,
        config=config, deadline_ms=_positive_int(limits, "deadline_ms", "limits"),
        memory_mb=_positive_int(limits, "memory_mb", "limits"),
        stdout_bytes=_positive_int(limits, "stdout_bytes", "limits"),
        filesystem=fs, env=tuple(sorted(env_raw.items())),
    )


def effective_limits(spec: ModuleSpec, settings: ModuleSettings) -> tuple[float, int, int]:
    """(deadline s, memory bytes, stdout bytes): the release's ask, never above the gateway's cap."""
    deadline_ms = min(spec.deadline_ms or settings.run_deadline_ms, settings.run_deadline_ms)
    memory_mb = min(spec.memory_mb or settings.memory_limit_mb, settings.memory_limit_mb)
    stdout = min(spec.stdout_bytes or settings.stdout_limit_bytes, settings.stdout_limit_bytes)
    return deadline_ms / 1000, memory_mb * 1024 * 1024, stdout
