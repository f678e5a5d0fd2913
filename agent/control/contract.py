"""The gate policy's contract: what it is asked about each module output, and what it answers.

Module outputs are validated by the runtime (``agent.runtime.contract.ModuleOutput``): actuations
(topic + payload) and property updates act on the world, so each one goes through the gate policy
first; events and derived telemetry are stored as they are.

Gate policy input (one evaluation per actuation / property update)::

    {"kind": "actuation" | "property",
     "source": {"module": "<release name>", "version": <int>},
     "node": "<node id>",
     "actuation": {"topic": ..., "payload": ..., "qos": 1, "retain": false},   # kind = actuation
     "property": {"device": ..., "name": ..., "value": ...},                   # kind = property
     "now": <wall clock seconds>}

Gate policy output — the value of the entrypoint (``[pipeline].policy_entrypoint``, default
``edge/decision``), i.e. ``result_set[0]["result"]``:

- ``true`` / ``false``: allow / deny;
- an object ``{"allow": bool, "reason": str, "payload": <new payload>, "value": <new value>,
  "mask": ["field", "a.b"], "clamp": {"field": [low, high]}}`` where everything but ``allow`` is
  optional: ``payload`` (actuation) / ``value`` (property) replaces what the module asked for, then
  ``mask`` removes fields (dotted paths into objects) and ``clamp`` bounds numeric fields (path ``""``
  is a bare-number payload/value itself);
- undefined (empty result set) or any other shape: deny, with the reason saying so.

The outcome is ``allow``, ``deny`` or ``modify`` (allowed, but what is published differs from what the
module asked for). Each decision is stored in ``decisions`` with its input, raw result and reason.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from agent.errors import AgentError


class OutputInvalid(AgentError):
    """A policy's modification (mask / clamp) does not follow the contract; the request is denied."""

    code = "policy_modification_invalid"


# ---- gate policy result → decision ----------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    outcome: str  # allow | deny | modify
    reason: str
    final: Any  # the payload / value to publish or store (None when denied)


def _get_path(doc: Any, path: str) -> tuple[Any, Any, str | None]:
    """(parent, value, last key) of a dotted path; parent None for the root."""
    if path in ("", "."):
        return None, doc, None
    parent: Any = None
    cur = doc
    key: str | None = None
    for key in path.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None, None, None
        parent, cur = cur, cur[key]
    return parent, cur, key


def apply_mask(doc: Any, paths: list[str]) -> Any:
    for path in paths:
        parent, _, key = _get_path(doc, path)
        if parent is not None and key is not None:
            del parent[key]
    return doc


def apply_clamp(doc: Any, bounds: dict[str, Any]) -> Any:
    for path, pair in bounds.items():
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in pair)):
            raise OutputInvalid(f"clamp bounds for '{path}' must be [low, high] numbers, got {pair!r}")
        low, high = pair
        parent, value, key = _get_path(doc, path)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        clamped = min(max(value, low), high)
        if parent is None:
            doc = clamped
        else:
            parent[key] = clamped
    return doc


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value (dicts, lists, scalars): several times cheaper than copy.deepcopy."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return copy.deepcopy(value)


def verdict(result_set: Any, requested: Any, kind: str) -> Verdict:
    """Turn the policy's result set into allow / deny / modify with a reason."""
    if not isinstance(result_set, list) or not result_set:
        return Verdict("deny", "policy result undefined (no rule matched): denied by default", None)
    first = result_set[0]
    result = first.get("result") if isinstance(first, dict) else None
    if result is True:
        return Verdict("allow", "policy allowed", requested)
    if result is False:
        return Verdict("deny", "policy denied", None)
    if not isinstance(result, dict) or not isinstance(result.get("allow"), bool):
        shown = json.dumps(result)[:120] if result is not None else "nothing"
        return Verdict("deny", f"policy result has an unexpected shape ({shown}): denied", None)
    reason = result.get("reason")
    reason_s = reason if isinstance(reason, str) and reason else ""
    if not result["allow"]:
        return Verdict("deny", reason_s or "policy denied", None)
    replace_key = "payload" if kind == "actuation" else "value"
    final = result.get(replace_key, requested)
    mask = result.get("mask", [])
    clamp = result.get("clamp", {})
    if mask or clamp or not isinstance(mask, list) or not isinstance(clamp, dict):
        # only a modification (or a malformed one) mutates: copy first, so neither the module's request
        # nor the policy's logged result change
        final = _copy(final)
        try:
            if not isinstance(mask, list) or not all(isinstance(m, str) for m in mask):
                raise OutputInvalid(f"mask must be a list of field paths, got {mask!r}")
            final = apply_mask(final, mask)
            if not isinstance(clamp, dict):
                raise OutputInvalid(f"clamp must be an object of field: [low, high], got {clamp!r}")
            final = apply_clamp(final, clamp)
        except OutputInvalid as exc:
            return Verdict("deny", f"policy modification invalid ({exc}): denied", None)
    if final != requested:
        return Verdict("modify", reason_s or "policy modified the request", final)
    return Verdict("allow", reason_s or "policy allowed", final)
