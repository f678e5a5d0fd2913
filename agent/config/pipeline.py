"""The ``[pipeline]`` table: durable ingest, retention, and the policy gate of actuations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.config.schema import between, non_negative, positive, setting


@dataclass(frozen=True)
class PipelineSettings:
    readings_max_rows: int = setting(
        1_000_000, check=non_negative,
        doc="Most sensor readings kept in SQLite (oldest deleted first); 0 = no count limit.")
    readings_max_age_s: float = setting(
        7 * 24 * 3600.0, check=non_negative,
        doc="Readings older than this (wall clock) are deleted; 0 = no age limit.")
    decisions_max_rows: int = setting(
        200_000, check=non_negative,
        doc="Most decisions kept in full in the local decision log (oldest deleted first, never before their "
            "window is sealed into the outbox); also bounds the actuation log. 0 = unlimited.")
    rejects_max_rows: int = setting(
        10_000, check=positive, doc="Most malformed messages kept (with their error) for a technician to inspect.")
    events_max_rows: int = setting(100_000, check=positive, doc="Most module events/alerts kept.")
    retention_interval_s: float = setting(30.0, check=positive, doc="How often retention runs.")
    ingest_batch_max: int = setting(
        256, check=positive, doc="Most messages stored in one write job (then acknowledged together); "
        "after a crash at most 3x this many readings can be redelivered and stored twice.")
    max_payload_bytes: int = setting(
        65536, check=positive, doc="Larger sensor payloads are rejected as malformed (and acknowledged).")
    policy_entrypoint: str = setting(
        "edge/decision", doc="Entrypoint of the gate policy that decides on actuations and property updates.")
    no_policy: Literal["deny", "allow"] = setting(
        "deny", doc="Decision when no gate policy is installed: deny (fail closed) or allow. "
        "A policy that fails to evaluate always denies.")
    actuation_qos: int = setting(1, check=between(0, 1), doc="QoS of published actuations.")
    publish_timeout_s: float = setting(5.0, check=positive, doc="Bound on waiting for the broker's PUBACK.")


@dataclass(frozen=True)
class AuditSettings:
    window_s: float = setting(
        900.0, check=between(10.0, 86_400.0),
        doc="Length of an audit rollup window (boot clock). Per window and per (policy version, subject, "
            "outcome, reason) the first decision is kept in full and the repeats are counted; errors, "
            "transitions and a new policy version's first window are always kept in full.")
    compact: bool = setting(
        True, doc="Roll up routine repeats (the bounded audit trail). false = keep every decision in full: "
                  "only for low rates, the disk budget then has to hold the whole outage.")
    subjects_max: int = setting(
        100_000, check=positive,
        doc="Most subjects whose last outcome is remembered for transition detection; beyond it the "
            "oldest are forgotten (their next decision is kept in full as if it were a transition).")
