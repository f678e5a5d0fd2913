"""The status report every subsystem adds a section to (``edge-agent status``), built from SQLite alone.

It lives with the storage layer because a section only ever reads the state database: each domain
package owns a ``status.py`` with its section, and ``agent.daemon.status`` puts them together.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig


@dataclass
class Report:
    data: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # the agent is not doing its job: unhealthy
    # worth a look, but the agent is doing its job (e.g. a fleet rollback it already handled, a cloud-side
    # misconfiguration, a forecast): a status that cries wolf teaches technicians to ignore it
    warnings: list[str] = field(default_factory=list)


#: one section of the report: reads ``conn`` (read-only), adds to the report
Section = Callable[[sqlite3.Connection, AgentConfig, Report], None]
