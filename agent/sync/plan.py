"""Pre-deployment planning: does an outage of N days at these rates fit the disk budget, and if not, what to change?

The model adds up what the agent keeps, from per-record costs measured by ``scripts/bench/bench_outage.py``
(bytes on disk per raw reading, rollup row, full decision, and per packed and compressed record in
the outbox). The built-in costs are that benchmark's figures on the development machine; pass the
JSON it writes (``--costs var/bench/outage.json``) to plan with your own measurement.

Local tables are bounded by their settings (raw window, rollup keep times, ``decisions_max_rows``);
the outbox grows with the outage until its budget, then sheds detail (docs/design.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from agent.config import AgentConfig

DAY = 86_400


@dataclass(frozen=True)
class Costs:
    """Bytes on disk per record (pages, indexes and free space included) and bytes written per event."""

    reading_row: float = 150.0  # raw reading (table + index)
    rollup_row: float = 90.0  # local telemetry rollup row (1 minute or 1 hour)
    decision_row: float = 700.0  # a decision kept in full in the local log
    actuation_row: float = 160.0
    outbox_count: float = 40.0  # one (key, window) count of an audit window, compressed
    outbox_full: float = 120.0  # one full decision record in an audit window, compressed
    outbox_rollup: float = 18.0  # one rollup row (device, metric, bucket), compressed
    outbox_event: float = 40.0
    written_per_decision: float = 0.0  # bytes written to storage per decision (measured), 0 = unknown
    source: str = "built-in (scripts/bench/bench_outage.py on the 2-core x86-64 development VM)"

    @classmethod
    def load(cls, path: Path | None) -> Costs:
        if path is None or not path.exists():
            return cls()
        data = json.loads(path.read_text())
        got = data.get("costs", data)
        known = {f.name for f in fields(cls)}
        return replace(cls(), **{k: v for k, v in got.items() if k in known}, source=str(path))


@dataclass(frozen=True)
class Load:
    readings_per_s: float
    decisions_per_reading: float
    days: float
    devices: int = 0  # 0 = one device per reading per second
    metrics_per_device: int = 1
    transitions_per_subject_per_day: float = 4.0
    events_per_s: float = 0.0


@dataclass
class Plan:
    fits: bool
    days_until_shedding: float
    outbox_bytes: int
    local_bytes: int
    total_bytes: int
    budget_bytes: int
    per_day: dict[str, int]
    local: dict[str, int]
    advice: list[str]
    written_per_day: int | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan(load: Load, config: AgentConfig, costs: Costs) -> Plan:
    devices = load.devices or max(1, math.ceil(load.readings_per_s))
    series = devices * load.metrics_per_device
    subjects = devices * max(1.0, load.decisions_per_reading)
    decisions_per_s = load.readings_per_s * load.decisions_per_reading
    window = config.audit.window_s
    windows_per_day = DAY / window
    # per window and key one count and (at least) one exemplar; a key per subject and outcome in use
    keys = subjects * 1.2
    transitions = subjects * load.transitions_per_subject_per_day
    full_per_day = windows_per_day * keys + transitions if config.audit.compact else decisions_per_s * DAY
    per_day = {
        "audit_counts": int(windows_per_day * keys * costs.outbox_count),
        "audit_full_records": int(full_per_day * costs.outbox_full),
        "telemetry_1m": int(series * 1440 * costs.outbox_rollup) if config.telemetry.cloud_rollups else 0,
        "telemetry_1h": int(series * 24 * costs.outbox_rollup) if config.telemetry.cloud_rollups else 0,
        "events": int(load.events_per_s * DAY * costs.outbox_event),
    }
    outbox_per_day = sum(per_day.values())
    p = config.pipeline
    raw_rows = load.readings_per_s * (p.readings_max_age_s or 1e12)
    if p.readings_max_rows:
        raw_rows = min(raw_rows, p.readings_max_rows)
    t = config.telemetry
    local = {
        "raw_readings": int(raw_rows * costs.reading_row),
        "rollups": int(series * (1440 * min(t.keep_1m_s, load.days * DAY) / DAY
                                 + 24 * min(t.keep_1h_s, load.days * DAY) / DAY) * costs.rollup_row),
        "decisions": int(min(p.decisions_max_rows or 1e15, full_per_day * load.days) * costs.decision_row),
        "actuations": int(min(p.decisions_max_rows or 1e15, decisions_per_s / 3 * DAY * load.days)
                          * costs.actuation_row),
    }
    budget = config.outbox.disk_budget_bytes
    outbox = int(outbox_per_day * load.days)
    days_ok = budget / outbox_per_day if outbox_per_day else float("inf")
    fits = outbox <= budget
    held = min(outbox, budget)
    total = sum(local.values()) + held
    advice: list[str] = []
    if not fits:
        advice.append(f"raise [outbox] disk_budget_bytes to {_round_up(outbox * 1.1)} (outage of {load.days:g} days "
                      f"needs {_mib(outbox)} at {_mib(outbox_per_day)}/day)")
        audit = per_day["audit_counts"] + per_day["audit_full_records"]
        rest = outbox_per_day - audit
        spare = budget / load.days - rest
        if spare > 0 and config.audit.compact:
            per_window = keys * (costs.outbox_count + costs.outbox_full)
            need = per_window * DAY / max(1.0, spare - transitions * costs.outbox_full)
            if 0 < need <= 86_400:
                advice.append(f"or widen [audit] window_s to {math.ceil(need / 60) * 60} s (now {window:g} s): "
                              "fewer windows, one exemplar per key each")
        if per_day["telemetry_1m"]:
            keep = max(0.0, (budget - (outbox_per_day - per_day["telemetry_1m"]) * load.days) / per_day["telemetry_1m"])
            advice.append(f"or accept that 1-minute rollups are shed beyond the newest ~{keep:.1f} days (1-hour "
                          "rollups stay; a gap record reports each shed range)")
    written = int(costs.written_per_decision * decisions_per_s * DAY) if costs.written_per_decision else None
    return Plan(fits, round(days_ok, 1), outbox, sum(local.values()), total, budget, per_day, local, advice,
                written)


def _mib(n: float) -> str:
    return f"{n / (1024 * 1024):,.1f} MiB"


def _round_up(n: float) -> int:
    step = 64 * 1024 * 1024
    return int(math.ceil(n / step) * step)


def render(load: Load, result: Plan, costs: Costs) -> str:
    lines = [f"Outage of {load.days:g} days at {load.readings_per_s:g} readings/s x {load.decisions_per_reading:g} "
             f"decisions/reading ({load.readings_per_s * load.decisions_per_reading:,.0f} decisions/s)", ""]
    lines.append("Outbox (what the cloud receives after the outage), per day:")
    for k, v in result.per_day.items():
        lines.append(f"  {k:<22} {_mib(v):>14}")
    lines.append(f"  {'total over the outage':<22} {_mib(result.outbox_bytes):>14}   "
                 f"budget {_mib(result.budget_bytes)}")
    lines.append("")
    lines.append("Local tables (bounded by their settings):")
    for k, v in result.local.items():
        lines.append(f"  {k:<22} {_mib(v):>14}")
    lines.append("")
    lines.append(f"Whole state at the end: {_mib(result.total_bytes)}")
    lines.append(f"The budget lasts {result.days_until_shedding:g} days before detail is shed.")
    if result.written_per_day is not None:
        lines.append(f"Bytes written per day (flash wear): about {_mib(result.written_per_day)}")
    lines.append("")
    lines.append("FITS: the outage fits the budget without shedding anything." if result.fits else
                 "DOES NOT FIT without shedding detail (counts and transitions are never shed). To change:")
    lines.extend(f"  - {a}" for a in result.advice)
    lines.append("")
    lines.append(f"Per-record costs: {costs.source}")
    return "\n".join(lines) + "\n"
