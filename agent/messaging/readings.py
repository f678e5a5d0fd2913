"""Sensor readings from the local bus: topic parsing and payload decoding.

Topic shapes (``factory`` is the configured root, the first level of the subscription filter):

- ``factory/<line>/<sensor>/<metric>`` with a bare number (``21.5``), a JSON number, a JSON object
  ``{"value": 21.5, ...}`` (other keys are kept as the reading's payload), or a JSON array of those
  (several readings of that metric in one message: how a sensor catches up after an outage);
- ``factory/<line>/<sensor>`` with a JSON object of ``metric → number`` (one reading per key).

The device of a reading is ``<line>/<sensor>``. Booleans count as 0/1; strings and other non-numeric
values are kept in ``payload`` with a NULL value. Anything else is a :class:`MalformedReading`.

Payloads are decoded by :mod:`agent.jsonsafe` (:data:`MAX_DEPTH` levels, no NaN/Infinity, integers
within 64 bits, no duplicate keys, no lone surrogates): whatever a reading holds can be stored,
compared, handed to a module and forwarded to a strict parser without failing later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent import jsonsafe
from agent.clock import Stamp
from agent.errors import AgentError

MAX_DEPTH = 16  # a reading object nests its extra fields a little; 16 levels is generous


class MalformedReading(AgentError):
    """A bus message that is not a reading; stored as a reject and acknowledged, never retried.

    ``reason`` is the specific rule (a :mod:`agent.jsonsafe` code such as ``json_non_finite``, or
    ``not_a_reading``, ``bad_topic``, ``too_large``): what ``status`` counts rejects by."""

    code = "malformed_reading"

    def __init__(self, message: str, *, reason: str = "not_a_reading") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reading:
    topic: str
    device: str
    metric: str
    value: float | None
    payload: str | None
    stamp: Stamp

    def row(self) -> tuple[Any, ...]:
        s = self.stamp
        return (self.topic, self.device, self.metric, self.value, self.payload, s.wall, s.boot_id, s.mono)


MAX_LEVEL_CHARS = 128


def _number(value: Any, where: str) -> tuple[float | None, str | None]:
    """(value, payload) of a decoded JSON value: numbers are finite and within 64 bits (jsonsafe)."""
    if isinstance(value, bool):
        return (1.0 if value else 0.0), None
    if isinstance(value, int | float):
        return float(value), None
    if isinstance(value, str | list | dict) or value is None:
        return None, jsonsafe.dumps(value)
    raise MalformedReading(f"{where}: unsupported value type {type(value).__name__}")


def _from_object(obj: dict[str, Any], where: str) -> tuple[float | None, str | None]:
    if "value" not in obj:
        raise MalformedReading(f"{where}: JSON object has no 'value' key (got keys {sorted(obj)[:8]})")
    value, _ = _number(obj["value"], where)
    return value, jsonsafe.dumps(obj, sort_keys=True)


def split_topic(topic: str) -> tuple[str, str, str | None]:
    """(line, sensor, metric or None) of ``<root>/<line>/<sensor>[/<metric>]``."""
    parts = topic.split("/")
    if len(parts) not in (3, 4) or not all(parts) or any(len(p) > MAX_LEVEL_CHARS for p in parts):
        raise MalformedReading(
            f"topic '{topic[:200]}' is not <root>/<line>/<sensor>/<metric> or <root>/<line>/<sensor>",
            reason="bad_topic")
    return parts[1], parts[2], parts[3] if len(parts) == 4 else None


def parse(topic: str, payload: bytes, stamp: Stamp, max_bytes: int = 65536) -> list[Reading]:
    """Decode one bus message into readings, or raise :class:`MalformedReading` saying why."""
    line, sensor, metric = split_topic(topic)
    device = f"{line}/{sensor}"
    if len(payload) > max_bytes:
        raise MalformedReading(f"{topic}: payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit",
                               reason="too_large")
    if not payload.strip():
        raise MalformedReading(f"{topic}: empty payload", reason="empty")
    try:
        doc = jsonsafe.loads(payload, jsonsafe.Limits(max_bytes, max_depth=MAX_DEPTH))
    except jsonsafe.JsonRejected as exc:
        if exc.code == "json_not_utf8":
            raise MalformedReading(f"{topic}: payload is {exc}", reason=exc.code) from None
        if exc.code == "json_syntax":
            raise MalformedReading(f"{topic}: payload is neither a number nor JSON ({exc})", reason=exc.code) from None
        if exc.code == "json_non_finite":
            raise MalformedReading(f"{topic}: payload is not a finite number or holds one: {exc}",
                                   reason=exc.code) from None
        raise MalformedReading(f"{topic}: payload refused: {exc}", reason=exc.code) from None
    if metric is None:
        if not isinstance(doc, dict) or not doc:
            raise MalformedReading(f"{topic}: a <root>/<line>/<sensor> topic needs a JSON object of metric: value")
        out = []
        for key, val in doc.items():
            if not key or any(c in key for c in "/+#\0") or len(key) > MAX_LEVEL_CHARS:
                raise MalformedReading(f"{topic}: invalid metric name {key[:40]!r} (it becomes a topic level)",
                                       reason="bad_topic")
            v, p = _from_object(val, f"{topic}.{key}") if isinstance(val, dict) else _number(val, f"{topic}.{key}")
            out.append(Reading(f"{topic}/{key}", device, key, v, p, stamp))
        return out
    if isinstance(doc, list):
        if not doc:
            raise MalformedReading(f"{topic}: empty JSON array")
        return [_one(topic, device, metric, item, stamp) for item in doc]
    return [_one(topic, device, metric, doc, stamp)]


def _one(topic: str, device: str, metric: str, doc: Any, stamp: Stamp) -> Reading:
    if isinstance(doc, dict):
        v, p = _from_object(doc, topic)
    elif isinstance(doc, list):
        raise MalformedReading(f"{topic}: nested JSON arrays are not readings")
    else:
        v, p = _number(doc, topic)
        if v is None and not isinstance(doc, str):
            raise MalformedReading(f"{topic}: payload {str(doc)[:40]} is not a reading value")
    return Reading(topic, device, metric, v, p, stamp)
