"""The ``[policy]`` table: sandbox limits of the OPA-Wasm engine."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import positive, setting


@dataclass(frozen=True)
class PolicySettings:
    eval_deadline_ms: int = setting(50, check=positive,
                                    doc="Wall-clock bound of one evaluation (epoch interruption).")
    memory_limit_mb: int = setting(64, check=positive, doc="Linear-memory cap of one policy instance.")
    decision_policy: str = setting("", doc="Name of the installed policy release that gates actuations and "
                                   "twin updates; empty = the first active policy.")
