"""Schema of the telemetry component (owned by its package)."""

MIGRATIONS: list[str] = []
