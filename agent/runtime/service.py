"""The daemon service that keeps the module runtime in step with the installed releases.

It listens to the release store's :class:`~agent.trust.watcher.ReleaseWatcher`: on every change
it loads each *active* release of kind ``module`` (precompiled code from the cache), swaps versions
between runs and unloads modules whose release is no longer active. A release whose predicate cannot be run is
reported and skipped; the version that was running keeps running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.runtime.modules import ModuleRuntime
from agent.runtime.scheduler import ModuleScheduler
from agent.trust.releases import Release, ReleaseStore

log = get_logger("modules")


class ModuleService:
    name = "modules"

    def __init__(self, runtime: ModuleRuntime, releases: ReleaseStore, *,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.runtime = runtime
        self.releases = releases
        self.on_status = on_status
        self.scheduler = ModuleScheduler(runtime)
        runtime.scheduler = self.scheduler
        self._sync_lock = asyncio.Lock()
        self._failed: dict[str, str] = {}

    async def run(self) -> None:
        try:
            try:
                await self.on_releases_changed()
            except Exception as exc:  # the watcher calls us again on the next change; keep the daemon up
                log.error("module_sync_failed", error=str(exc), error_type=type(exc).__name__)
                await self.runtime.store.record_error("modules", "module_sync_failed", f"loading modules failed: {exc}")
            await self.scheduler.start()
            self._set_status()
            await asyncio.Event().wait()
        finally:
            self.scheduler.stop()
            await self.runtime.close()

    async def reload(self, config: AgentConfig) -> None:
        self.runtime.reconfigure(config.modules)

    def _set_status(self) -> None:
        names = self.runtime.registry.names()
        failed = f", {len(self._failed)} failed" if self._failed else ""
        if self.on_status is not None:
            self.on_status(f"{len(names)} loaded{failed}")

    async def on_releases_changed(self) -> None:
        """Load/swap/unload modules to match the active module releases."""
        async with self._sync_lock:
            store = self.releases
            active = [r for r in await run_blocking(store.list) if r.kind == "module" and r.state == "active"]
            # "active" is the gateway's decision to run it (install and the fleet link check targets)
            wanted: dict[str, Release] = {rel.name: rel for rel in active}
            for name in self.runtime.registry.names():
                if name not in wanted:
                    await self.runtime.unload(name)
            for name, rel in sorted(wanted.items()):
                current = self.runtime.registry.get(name)
                if current is not None and current.sha256 == rel.sha256 and current.version == rel.version:
                    continue
                if self._failed.get(name) == f"{rel.version}:{rel.sha256}":
                    continue
                try:
                    wasm = await store.aartifact_bytes(rel.sha256)
                    await self.runtime.load_release(name, rel.version, rel.sha256, wasm, dict(rel.predicate.raw))
                    self._failed.pop(name, None)
                except AgentError as exc:
                    self._failed[name] = f"{rel.version}:{rel.sha256}"
                    log.error("module_load_failed", module=name, version=rel.version, error=str(exc), code=exc.code)
                    await self.runtime.store.record_error("modules", exc.code,
                                                          f"module '{name}' v{rel.version} not loaded: {exc}")
                except Exception as exc:  # e.g. wasmtime rejecting the code: keep the others running
                    self._failed[name] = f"{rel.version}:{rel.sha256}"
                    log.error("module_load_failed", module=name, version=rel.version, error=str(exc),
                              error_type=type(exc).__name__)
                    await self.runtime.store.record_error("modules", "module_load_failed",
                                                          f"module '{name}' v{rel.version} not loaded: {exc}")
        self._set_status()
