"""What every service of the running daemon shares."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from agent.config import AgentConfig
from agent.daemon.notify import Notifier
from agent.handlers import Handlers
from agent.storage import Store


class Service(Protocol):
    """A long-running part of the daemon. ``run`` returns only when cancelled (or on a fatal error)."""

    name: str

    async def run(self) -> None: ...


class Reloadable(Protocol):
    """A part of the daemon that applies a new config on SIGHUP (listed in ``Components.reloadables``)."""

    name: str

    async def reload(self, config: AgentConfig) -> None: ...


@dataclass
class Context:
    config: AgentConfig
    config_path: Path | None
    store: Store
    notifier: Notifier
    started_at: float = field(default_factory=time.time)
    # how the previous run of the daemon ended: "stopped" (cleanly), "failed", other = it died; None = first
    previous_end: str | None = None
    # short "what it is doing" phrases per service, joined into the sd_notify STATUS= line
    status_parts: dict[str, str] = field(default_factory=dict)
    # every message handler of every service, guarded alike (failures counted in the store's rejects)
    handlers: Handlers = field(default_factory=Handlers)

    def __post_init__(self) -> None:
        self.handlers.bind(self.store.rejects)

    @property
    def after_failure(self) -> bool:
        """This start follows a run that died (SIGKILL, power cut, OOM) or stopped after a failure."""
        return self.previous_end not in (None, "stopped")

    def set_status(self, part: str, text: str) -> None:
        self.status_parts[part] = text

    @property
    def status_text(self) -> str:
        return "; ".join(f"{k}: {v}" for k, v in sorted(self.status_parts.items())) or "running"
