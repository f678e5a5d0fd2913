"""Schema of the fleet component (owned by its package)."""

MIGRATIONS: list[str] = []
