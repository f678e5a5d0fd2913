"""Schema of the module runtime: run history, saved module state, schedule last-run times.

Contracts other components rely on (add columns only by new migrations):
- ``module_runs``: one row per module run with its outcome (``ok`` or an error code) — read by
  ``status`` and by the fleet's hot-swap health check (error rate of a new version).
- ``module_state``: the latest saved ``state`` a module returned, per module name.
- ``module_schedules``: the last run time of each scheduled module; the scheduler rebuilds its jobs
  from this at start-up, so a reboot neither loses nor duplicates runs beyond its misfire policy.
"""

MIGRATIONS: list[str] = [
    """
    CREATE TABLE module_runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        trigger_kind TEXT NOT NULL,
        trigger TEXT NOT NULL,
        readings INTEGER NOT NULL DEFAULT 0,
        started_wall REAL NOT NULL,
        boot_id TEXT NOT NULL,
        mono REAL NOT NULL,
        duration_ms REAL NOT NULL,
        outcome TEXT NOT NULL,
        error TEXT NOT NULL DEFAULT '',
        stdout_bytes INTEGER NOT NULL DEFAULT 0,
        outputs TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX module_runs_name ON module_runs (name, id);
    CREATE INDEX module_runs_outcome ON module_runs (outcome, id);
    CREATE TABLE module_state (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        version INTEGER NOT NULL,
        updated_wall REAL NOT NULL
    );
    CREATE TABLE module_schedules (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        last_run_wall REAL,
        last_scheduled_wall REAL,
        runs INTEGER NOT NULL DEFAULT 0,
        updated_wall REAL NOT NULL
    );
    """,
]
