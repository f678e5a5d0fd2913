"""Every message handler of the daemon, registered in one place and guarded the same way.

A handler is the code a message from outside reaches first (a bus route, the KubeEdge answers, the
fleet link, the listeners of committed readings, the sink of module outputs). Whatever a handler
raises is a bug, and it must cost one message, never a connection, a service or the daemon: the
guard logs it (``handler_failed``), counts it as a reject of its source (``status`` shows it as a
problem), and returns ``FAILED`` so the transport can settle the message (acknowledge it: a message
that makes its handler fail would fail it again on every redelivery).

Transports dispatch through their :class:`Handler` entry, never around it: the registry is also how a
test finds every handler of a built daemon and injects a failure into each, so none is forgotten.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from agent.logs import get_logger

log = get_logger("handlers")

HANDLER_FAILED: Final = "handler_failed"


class _Failed:
    def __repr__(self) -> str:
        return "FAILED"


FAILED: Final[Any] = _Failed()
"""What a guarded call returns when the handler raised."""


class RejectSink(Protocol):
    def note(self, source: str, code: str, detail: str) -> None: ...


@dataclass(eq=False)
class Handler:
    """One entry point. ``source`` is the reject source (``local_bus``, ``kubeedge``, ``fleet``, …),
    ``name`` what it handles (a topic filter, ``readings_committed``, ``module_output``); ``filters``
    the MQTT topic filters whose messages it receives (empty for in-process events)."""

    source: str
    name: str
    fn: Callable[..., Any]
    filters: tuple[str, ...] = ()
    calls: int = 0
    failures: int = 0
    last_error: str = field(default="", repr=False)


class Handlers:
    """The registry and the guard."""

    def __init__(self, rejects: RejectSink | None = None) -> None:
        self._rejects = rejects
        self._entries: list[Handler] = []

    def bind(self, rejects: RejectSink) -> None:
        """Where failures are counted (the store's reject counter, once the store is open)."""
        self._rejects = rejects

    def add(self, source: str, name: str, fn: Callable[..., Any], filters: tuple[str, ...] = ()) -> Handler:
        entry = Handler(source, name, fn, tuple(filters))
        self._entries.append(entry)
        return entry

    def remove(self, entry: Handler) -> None:
        if entry in self._entries:
            self._entries.remove(entry)

    def __iter__(self) -> Iterator[Handler]:
        return iter(list(self._entries))

    def call(self, entry: Handler, *args: Any) -> Any:
        """Run a synchronous handler; ``FAILED`` if it raised (logged and counted)."""
        entry.calls += 1
        try:
            return entry.fn(*args)
        except Exception as exc:
            self._failed(entry, exc)
            return FAILED

    async def acall(self, entry: Handler, *args: Any) -> Any:
        """Run an async handler; ``FAILED`` if it raised (logged and counted)."""
        entry.calls += 1
        try:
            result: Awaitable[Any] = entry.fn(*args)
            return await result
        except Exception as exc:
            self._failed(entry, exc)
            return FAILED

    def _failed(self, entry: Handler, exc: Exception) -> None:
        entry.failures += 1
        entry.last_error = f"{type(exc).__name__}: {exc}"[:500]
        log.error("handler_failed", source=entry.source, handler=entry.name, error=str(exc)[:500],
                  error_type=type(exc).__name__, failures=entry.failures)
        if self._rejects is not None:
            try:
                self._rejects.note(entry.source, HANDLER_FAILED, f"{entry.name}: {entry.last_error}")
            except Exception as err:  # counting must not turn one failure into two
                log.error("handler_failure_not_counted", source=entry.source, error=str(err))
