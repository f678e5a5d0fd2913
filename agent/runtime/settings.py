"""The ``[modules]`` table: sandbox limits of Wasm workload modules."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import positive, setting


@dataclass(frozen=True)
class ModuleSettings:
    run_deadline_ms: int = setting(1000, check=positive, doc="Wall-clock bound of one module run.")
    memory_limit_mb: int = setting(32, check=positive, doc="Linear-memory cap of one module instance.")
    stdout_limit_bytes: int = setting(256 * 1024, check=positive, doc="Largest output a module may write.")
