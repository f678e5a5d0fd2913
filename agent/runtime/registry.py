"""The active module per name, swapped atomically *between* runs.

A run holds its module's lock for its whole duration (:meth:`ModuleRegistry.using`), and a swap
takes the same lock, so a swap waits for the in-flight run, and the next run already sees the new
version: no run ever mixes two versions, none is dropped. ``asyncio.Lock`` is FIFO, so a busy
module cannot starve a swap. Listeners (the scheduler, the fleet's hot swap) hear every change.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import wasmtime

from agent.logs import get_logger
from agent.runtime.contract import ModuleError
from agent.runtime.spec import ModuleSpec

log = get_logger("modules")


class ModuleNotLoaded(ModuleError):
    code = "module_not_loaded"


@dataclass(frozen=True)
class LoadedModule:
    """A compiled module ready to run, with the release facts it came from."""

    name: str
    version: int
    sha256: str
    module: wasmtime.Module
    spec: ModuleSpec
    source: str = "compiled"   # "cache" (precompiled code) or "compiled" (compiled at load)
    load_ms: float = 0.0


Listener = Callable[[str, LoadedModule | None, LoadedModule | None], None]


class ModuleRegistry:
    def __init__(self) -> None:
        self._active: dict[str, LoadedModule] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """``listener(name, old, new)`` is called after every install, swap and removal."""
        self._listeners.append(listener)

    def get(self, name: str) -> LoadedModule | None:
        return self._active.get(name)

    def names(self) -> list[str]:
        return sorted(self._active)

    def all(self) -> list[LoadedModule]:
        return [self._active[n] for n in sorted(self._active)]

    def _lock(self, name: str) -> asyncio.Lock:
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def using(self, name: str) -> AsyncIterator[LoadedModule]:
        """Hold ``name``'s active module for one run; raises :class:`ModuleNotLoaded` if there is none."""
        async with self._lock(name):
            loaded = self._active.get(name)
            if loaded is None:
                raise ModuleNotLoaded(f"no module named '{name}' is installed and loaded on this gateway")
            yield loaded

    async def swap(self, new: LoadedModule) -> LoadedModule | None:
        """Make ``new`` the active version of its name once the current run (if any) has finished."""
        async with self._lock(new.name):
            old = self._active.get(new.name)
            self._active[new.name] = new
        log.info("module_activated", module=new.name, version=new.version, sha256=new.sha256[:16],
                 previous=old.version if old else None, source=new.source)
        self._notify(new.name, old, new)
        return old

    async def remove(self, name: str) -> LoadedModule | None:
        async with self._lock(name):
            old = self._active.pop(name, None)
        if old is not None:
            log.info("module_unloaded", module=name, version=old.version)
            self._notify(name, old, None)
        return old

    def _notify(self, name: str, old: LoadedModule | None, new: LoadedModule | None) -> None:
        for listener in self._listeners:
            try:
                listener(name, old, new)
            except Exception as exc:  # a listener bug must not undo the swap
                log.error("module_listener_failed", module=name, error=str(exc), error_type=type(exc).__name__)
