"""Schema of the trust component (owned by its package)."""

MIGRATIONS: list[str] = []
