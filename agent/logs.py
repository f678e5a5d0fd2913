"""structlog set-up: a pipeline of tiny pure processors.

Not on a TTY (systemd): one JSON object per line, prefixed with ``<N>`` so journald takes the
syslog priority from it (``SyslogLevelPrefix=yes`` is systemd's default). On a TTY: readable lines.
Event names are stable snake_case identifiers; values never carry secrets (see ``redact``).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

# syslog priorities, as journald reads them from the line prefix
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_SECRET_MARKERS = ("password", "passphrase", "secret", "token", "private_key")

EventDict = MutableMapping[str, Any]


def redact(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """Blank out any field whose name says it is a secret, wherever it was logged from."""
    for key in event:
        if any(marker in key.lower() for marker in _SECRET_MARKERS):
            event[key] = "***"
    return event


def journald_prefix(_logger: Any, name: str, event: EventDict) -> EventDict:
    event["_priority"] = _PRIORITY.get(event.get("level", name), 6)
    return event


class _PrefixedJSON:
    """Render JSON and put the journald ``<N>`` priority in front of the line."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer(sort_keys=False)

    def __call__(self, logger: Any, name: str, event: EventDict) -> str:
        priority = event.pop("_priority", 6)
        return f"<{priority}>" + str(self._json(logger, name, event))


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto",
              stream: TextIO | None = None) -> None:
    """Configure structlog once per process; safe to call again on SIGHUP."""
    out = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        redact,
    ]
    renderer: list[Any]
    if as_json:
        renderer = [structlog.processors.format_exc_info, journald_prefix, _PrefixedJSON()]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger bound to its component name, so every event says where it came from."""
    return structlog.get_logger().bind(component=component)
