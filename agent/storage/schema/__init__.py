"""Per-component schema migrations; see ``agent/storage/migrations.py``."""
