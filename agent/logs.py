"""structlog set-up: a pipeline of tiny pure processors.

Not on a TTY (systemd): one JSON object per line, prefixed with ``<N>`` so journald takes the
syslog priority from it (``SyslogLevelPrefix=yes`` is systemd's default). On a TTY: readable lines.
Event names are stable snake_case identifiers; values never carry secrets (see ``redact``).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any, Literal, TextIO

import structlog

# syslog priorities, as journald reads them from the line prefix
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_SECRET_MARKERS = ("password", "passphrase", "secret", "token", "private_key")

EventDict = MutableMapping[str, Any]


def _is_secret(key: object) -> bool:
    return isinstance(key, str) and any(marker in key.lower() for marker in _SECRET_MARKERS)


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > 5:
        return value
    if isinstance(value, dict):
        return {k: "***" if _is_secret(k) else _scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v, depth + 1) for v in value)
    return value


def redact(_logger: Any, _name: str, event: EventDict) -> EventDict:
    """Blank out any field whose name says it is a secret (also inside logged dicts), wherever it was
    logged from. Config secrets are also kept out of reprs (``setting(secret=True)``)."""
    for key in list(event):
        if _is_secret(key):
            event[key] = "***"
        elif isinstance(event[key], dict | list | tuple):
            event[key] = _scrub(event[key])
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


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is *now* (a test harness or daemoniser may swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _SafeLogger:
    """Writes one rendered line; a line that cannot be written is dropped (and counted), never raised.

    A closed or broken stream (journald restarted, a test's captured stream gone) must not kill the
    thread that logged — the SQLite writer above all.
    """

    _lock = threading.Lock()
    dropped = 0

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def msg(self, message: str) -> None:
        try:
            with self._lock:
                self._stream.write(message + "\n")
                self._stream.flush()
        except (OSError, ValueError):
            _SafeLogger.dropped += 1

    log = debug = info = warn = warning = error = critical = exception = fatal = failure = err = msg


def configure(level: str = "info", fmt: Literal["auto", "json", "console"] = "auto",
              stream: TextIO | None = None) -> None:
    """Configure structlog once per process; safe to call again on SIGHUP."""
    out: Any = stream or _CurrentStderr()
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
        logger_factory=lambda *_args: _SafeLogger(out),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> Any:
    """A logger bound to its component name, so every event says where it came from.

    It is a lazy proxy: it follows :func:`configure` even when created at import time (module-level
    ``log = get_logger(...)``) and after a SIGHUP changes the level. Calling ``.bind()`` on it at import
    time would freeze structlog's *default* configuration into the result: bind per use instead.
    """
    return structlog.get_logger(component=component)
