"""Schema of the outbox component (owned by its package)."""

MIGRATIONS: list[str] = []
