"""The ``[modules]`` table: sandbox limits of Wasm workload modules and their scheduling policy."""

from __future__ import annotations

from dataclasses import dataclass

from agent.config.schema import non_negative, positive, setting


@dataclass(frozen=True)
class ModuleSettings:
    run_deadline_ms: int = setting(1000, check=positive, doc="Wall-clock bound of one module run.")
    memory_limit_mb: int = setting(32, check=positive, doc="Linear-memory cap of one module instance.")
    stdout_limit_bytes: int = setting(256 * 1024, check=positive, doc="Largest output a module may write.")
    input_limit_bytes: int = setting(
        1024 * 1024, check=positive,
        doc="Largest input document (trigger + readings + config + state); oldest readings are dropped to fit.")
    state_limit_bytes: int = setting(64 * 1024, check=positive, doc="Largest saved state a module may return.")
    max_outputs: int = setting(1000, check=positive,
                               doc="Most entries per output list (properties, actuations, events, telemetry).")
    max_readings: int = setting(1000, check=positive, doc="Most readings handed to one run (newest kept).")
    allow_filesystem: bool = setting(
        False, doc="Let modules whose release declares `permissions.filesystem` see their own scratch dir.")
    allow_env: bool = setting(False, doc="Let modules whose release declares `permissions.env` get those variables.")
    misfire_grace_s: int = setting(
        3600, check=positive,
        doc="A scheduled run missed (agent down) by less than this is run once at start-up; older ones are skipped.")
    runs_kept: int = setting(10000, check=positive, doc="Run-history rows kept in SQLite (oldest deleted first).")
    batch_max_readings: int = setting(
        1000, check=positive, doc="Most readings a topic-triggered module accumulates in one batch window.")
    default_batch_window_ms: int = setting(
        0, check=non_negative,
        doc="Batch window of a topic trigger whose release does not set one. 0 = run at once: readings "
            "that arrive while a run is in progress still form the next batch, so 0 costs no extra runs.")
