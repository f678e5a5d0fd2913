"""Typed errors. Every message must tell a field technician what is wrong and what to do."""

from __future__ import annotations


class AgentError(Exception):
    """Base of every error the agent raises on purpose.

    ``code`` is a stable machine-readable name (logged and reported to the fleet);
    the message is for humans.
    """

    code = "agent_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ConfigError(AgentError):
    """The configuration file is missing, unreadable or invalid."""

    code = "config_invalid"


class StorageError(AgentError):
    """The state database cannot be opened, migrated or written."""

    code = "storage_error"


class StorageFull(StorageError):
    """The state disk is full: nothing more can be written until space is freed. Transient by nature:
    what waits on it retries (the broker keeps unacknowledged readings) instead of giving up."""

    code = "storage_full"


class DatabaseCorrupt(StorageError):
    """The database failed its integrity check; it was moved aside."""

    code = "database_corrupt"
