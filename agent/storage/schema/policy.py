"""Schema of the policy component (owned by its package)."""

MIGRATIONS: list[str] = []
