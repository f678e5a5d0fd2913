"""Schema of the runtime component (owned by its package)."""

MIGRATIONS: list[str] = []
