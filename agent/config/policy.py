"""The ``[policy]`` table: sandbox limits and tuning of the OPA-Wasm engine."""

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
    max_output_bytes: int = setting(1024 * 1024, check=positive,
                                    doc="Largest result set (JSON bytes) one evaluation may return.")
    pool_size: int = setting(4, check=positive,
                             doc="Idle instances kept per policy (one per concurrently evaluating thread).")
    fast_calls: bool = setting(True, doc="Use the pinned wasmtime-py fast call path; false = public API "
                               "(about 10x slower, for a wasmtime upgrade gone wrong).")
