"""The module contract: one JSON document in on stdin, one JSON document out on stdout.

Input (built by :func:`build_input`)::

    {"trigger": {"kind": "schedule"|"topic"|"manual", "time": ISO-8601 UTC, "wall": float, ...},
     "readings": [{"device", "metric", "value", "wall", "topic"}, ...],   # oldest first
     "config": {...},          # the release predicate's "config" object
     "state": <last saved state or null>}

Output (checked by :func:`parse_output`, strictly: a module is untrusted code)::

    {"properties": [{"device", "name", "value", "type"}],
     "actuations": [{"topic", "payload"}],
     "events":     [{"severity", "type", "message", ...}],
     "telemetry":  [{"device", "metric", "value", "wall"?}],
     "state": <new saved state>}

Every key of the output is optional (missing list = empty; missing ``state`` = keep the old one);
unknown top-level keys are an error so a typo is not silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypedDict

from agent import jsonsafe
from agent.errors import AgentError

PROPERTY_TYPES = ("string", "int", "integer", "float", "boolean")
SEVERITIES = ("debug", "info", "warning", "error", "critical")
OUTPUT_KEYS = ("properties", "actuations", "events", "telemetry", "state")
MAX_STRING = 4096


class ModuleError(AgentError):
    """Base of the runtime's errors."""

    code = "module_error"


class ModuleOutputInvalid(ModuleError):
    """The module wrote something that is not a valid output document."""

    code = "module_output_invalid"


class Reading(TypedDict):
    """One stored sensor reading as a module sees it."""

    device: str
    metric: str
    value: float | None
    wall: float
    topic: str


TriggerKind = Literal["schedule", "topic", "manual"]


def make_trigger(kind: TriggerKind, wall: float, **extra: Any) -> dict[str, Any]:
    """A trigger document: kind, ISO time (UTC) and wall seconds, plus kind-specific fields."""
    iso = datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"kind": kind, "time": iso, "wall": wall, **extra}


@dataclass(frozen=True)
class Property:
    device: str
    name: str
    value: str | int | float | bool
    type: str


@dataclass(frozen=True)
class Actuation:
    topic: str
    payload: Any


@dataclass(frozen=True)
class ModuleOutput:
    """A validated module output, plus which module/version/run produced it."""

    name: str
    version: int
    trigger: dict[str, Any]
    properties: list[Property] = field(default_factory=list)
    actuations: list[Actuation] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    state: Any = None
    state_set: bool = False
    run_id: int | None = None
    # the compact JSON of ``state`` as measured against the state limit: stored as is, not re-encoded
    state_json: str | None = field(default=None, repr=False, compare=False)

    def summary(self) -> dict[str, int]:
        return {"properties": len(self.properties), "actuations": len(self.actuations),
                "events": len(self.events), "telemetry": len(self.telemetry)}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def build_input(trigger: dict[str, Any], readings: list[Reading], config: dict[str, Any], state: Any,
                limit_bytes: int) -> tuple[bytes, int]:
    """Serialize the input document; drop the oldest readings until it fits ``limit_bytes``.

    Returns the bytes and how many readings made it in. Raises if even zero readings do not fit
    (the config or saved state alone is too large: a release or module bug worth a clear error).
    """
    kept = list(readings)
    while True:
        doc = {"trigger": trigger, "readings": kept, "config": config, "state": state}
        data = jsonsafe.dumps(doc).encode()
        if len(data) <= limit_bytes:
            return data, len(kept)
        if not kept:
            raise ModuleError(f"the module's input is {len(data)} bytes without any readings, over the "
                              f"{limit_bytes}-byte limit: its config or saved state is too large "
                              "(raise [modules].input_limit_bytes or fix the module)", code="module_input_too_large")
        kept = kept[len(kept) // 2 + 1:] if len(kept) > 8 else kept[1:]



def _text(where: str, value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ModuleOutputInvalid(f"{where} must be a string, got {type(value).__name__}")
    if not empty and not value:
        raise ModuleOutputInvalid(f"{where} must not be empty")
    if len(value) > MAX_STRING:
        raise ModuleOutputInvalid(f"{where} is {len(value)} characters long (limit {MAX_STRING})")
    return value


def _list(doc: dict[str, Any], key: str, max_items: int) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise ModuleOutputInvalid(f"output '{key}' must be a list, got {type(value).__name__}")
    if len(value) > max_items:
        raise ModuleOutputInvalid(f"output '{key}' has {len(value)} entries (limit {max_items})")
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise ModuleOutputInvalid(f"output '{key}[{i}]' must be an object, got {type(item).__name__}")
    return value


_PROPERTY_KEYS = frozenset({"device", "name", "value", "type"})


def _short_text(value: Any) -> bool:
    """The common case of :func:`_text` (a non-empty string within the limit), without building messages."""
    return isinstance(value, str) and 0 < len(value) <= MAX_STRING


def _property(i: int, item: dict[str, Any]) -> Property:
    where = f"properties[{i}]"
    if not _PROPERTY_KEYS.issuperset(item):
        raise ModuleOutputInvalid(f"{where} has unknown keys {sorted(set(item) - _PROPERTY_KEYS)}")
    ptype = item.get("type", "string")
    if ptype not in PROPERTY_TYPES:
        raise ModuleOutputInvalid(f"{where}.type must be one of {', '.join(PROPERTY_TYPES)}, got {ptype!r}")
    value = item.get("value")
    if ptype == "string":
        ok = isinstance(value, str)
    elif ptype == "float":
        ok = _finite(value)
    elif ptype == "boolean":
        ok = isinstance(value, bool)
    else:  # int / integer
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise ModuleOutputInvalid(f"{where}.value {value!r} is not a valid {ptype}")
    if isinstance(value, str) and len(value) > MAX_STRING:
        _text(f"{where}.value", value, empty=True)
    checked: str | int | float | bool = value  # type: ignore[assignment]  # checked by `ok` above
    device, name = item.get("device"), item.get("name")
    if not _short_text(device):
        _text(f"{where}.device", device)
    if not _short_text(name):
        _text(f"{where}.name", name)
    return Property(device=device, name=name, value=checked, type=ptype)  # type: ignore[arg-type]  # checked


def _actuation(i: int, item: dict[str, Any]) -> Actuation:
    where = f"actuations[{i}]"
    unknown = set(item) - {"topic", "payload"}
    if unknown:
        raise ModuleOutputInvalid(f"{where} has unknown keys {sorted(unknown)}")
    topic = _text(f"{where}.topic", item.get("topic"))
    if "+" in topic or "#" in topic or "\0" in topic or topic.startswith("$"):
        raise ModuleOutputInvalid(f"{where}.topic {topic!r} is not a publishable MQTT topic")
    if "payload" not in item:
        raise ModuleOutputInvalid(f"{where} has no payload")
    return Actuation(topic=topic, payload=item["payload"])


def _event(i: int, item: dict[str, Any]) -> dict[str, Any]:
    where = f"events[{i}]"
    severity = item.get("severity")
    if severity not in SEVERITIES:
        raise ModuleOutputInvalid(f"{where}.severity must be one of {', '.join(SEVERITIES)}, got {severity!r}")
    _text(f"{where}.type", item.get("type"))
    _text(f"{where}.message", item.get("message"), empty=True)
    return dict(item)


def _telemetry(i: int, item: dict[str, Any]) -> dict[str, Any]:
    where = f"telemetry[{i}]"
    unknown = set(item) - {"device", "metric", "value", "wall"}
    if unknown:
        raise ModuleOutputInvalid(f"{where} has unknown keys {sorted(unknown)}")
    _text(f"{where}.device", item.get("device"))
    _text(f"{where}.metric", item.get("metric"))
    if not _finite(item.get("value")):
        raise ModuleOutputInvalid(f"{where}.value must be a finite number, got {item.get('value')!r}")
    if "wall" in item and not _finite(item["wall"]):
        raise ModuleOutputInvalid(f"{where}.wall must be a number (Unix seconds), got {item['wall']!r}")
    return dict(item)


OUTPUT_MAX_DEPTH = 64  # outputs, state included: deep enough for any real state, bounded for every parser after


def parse_output(raw: bytes, *, name: str, version: int, trigger: dict[str, Any], max_items: int,
                 state_limit_bytes: int) -> ModuleOutput:
    """Validate a module's stdout bytes into a :class:`ModuleOutput`, or raise :class:`ModuleOutputInvalid`.

    Decoded by :mod:`agent.jsonsafe`: a module's output is stored (state, telemetry), put to the gate
    policy and forwarded to the cloud (decision log), so nothing in it may be NaN, infinite (``1e400``),
    an integer past 64 bits or a lone surrogate: the run is ``output_invalid`` instead, never a
    poisoned state that bricks the module's next runs."""
    if not raw.strip():
        raise ModuleOutputInvalid("the module wrote nothing on stdout (expected one JSON object)")
    try:
        doc = jsonsafe.loads(raw, jsonsafe.Limits(len(raw), max_depth=OUTPUT_MAX_DEPTH))
    except jsonsafe.JsonRejected as exc:
        if exc.code == "json_not_utf8":
            raise ModuleOutputInvalid(f"stdout is {exc}") from None
        if exc.code == "json_syntax":
            snippet = raw[:60].decode("utf-8", "replace").encode("unicode_escape").decode()
            raise ModuleOutputInvalid(f"stdout is not one JSON document ({exc}); it starts with '{snippet}'") from None
        raise ModuleOutputInvalid(f"stdout JSON refused ({exc.code}): {exc}") from None
    if not isinstance(doc, dict):
        raise ModuleOutputInvalid(f"stdout must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - set(OUTPUT_KEYS)
    if unknown:
        raise ModuleOutputInvalid(f"output has unknown keys {sorted(unknown)} (allowed: {', '.join(OUTPUT_KEYS)})")
    state_set = "state" in doc
    state = doc.get("state")
    state_json = None
    if state_set:
        state_json = jsonsafe.dumps(state)
        size = len(state_json)  # ASCII (ensure_ascii): characters = bytes
        if size > state_limit_bytes:
            raise ModuleOutputInvalid(f"saved state is {size} bytes (limit {state_limit_bytes})")
    return ModuleOutput(
        name=name, version=version, trigger=trigger,
        properties=[_property(i, p) for i, p in enumerate(_list(doc, "properties", max_items))],
        actuations=[_actuation(i, a) for i, a in enumerate(_list(doc, "actuations", max_items))],
        events=[_event(i, e) for i, e in enumerate(_list(doc, "events", max_items))],
        telemetry=[_telemetry(i, t) for i, t in enumerate(_list(doc, "telemetry", max_items))],
        state=state, state_set=state_set, state_json=state_json,
    )
