"""Storage: the one SQLite database of an agent (WAL, one writer, versioned schema)."""

from agent.storage.store import Store
from agent.storage.writer import Writer

__all__ = ["Store", "Writer"]
