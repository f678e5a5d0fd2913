"""The one small interface for host builtins: ``Builtins.register(name, fn)``.

A builtin is ``fn(ctx: BuiltinContext, *args) -> JSON value``. Arguments arrive as plain JSON
values (sets as sorted lists). Return :data:`UNDEFINED` to make the calling expression undefined;
raise :class:`~agent.policy.errors.BuiltinError` to fail the evaluation. The agent's own builtins
(read-only local state, say) are registered on a copy of :func:`agent.policy.builtins.default_builtins`
and handed to ``load_policy(..., builtins=...)``. A policy naming a builtin that is not registered is
refused at load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any


class _Undefined:
    _instance: _Undefined | None = None

    def __new__(cls) -> _Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED: Any = _Undefined()


@dataclass
class BuiltinContext:
    """Per-evaluation state shared by builtins: one ``time.now_ns`` value, per-eval caches."""

    now_ns: int
    cache: dict[Any, Any] = field(default_factory=dict)


BuiltinFn = Callable[..., Any]


class Builtins:
    """Name → implementation. Copy before adding agent-specific builtins."""

    def __init__(self, table: dict[str, BuiltinFn] | None = None) -> None:
        self._table: dict[str, BuiltinFn] = dict(table or {})

    def register(self, name: str, fn: BuiltinFn) -> None:
        """Add (or replace) the builtin ``name`` (as OPA names it, e.g. ``"agent.state"``)."""
        self._table[name] = fn

    def get(self, name: str) -> BuiltinFn | None:
        return self._table.get(name)

    def copy(self) -> Builtins:
        return Builtins(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._table))
