"""Keeps the active policies in step with the installed (signed) policy releases.

The module runtime has its service for ``kind = "module"``; this is the same for ``kind = "policy"``:
on start and on every release change (it listens to the release watcher) each *active* policy
release is loaded through the :class:`~agent.policy.runtime.PolicyRuntime` — precompiled code from
the artifact cache, bound to the artifact's sha256 — and swapped into its registry, which the
pipeline's gate reads and the fleet's swap orchestrator writes. A version already active is left
alone, so a fleet hot swap and this loader never fight; a release that fails to load leaves the
previous version running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent.config import AgentConfig
from agent.errors import AgentError
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.policy.runtime import PolicyRuntime
from agent.trust.releases import ReleaseStore

log = get_logger("pipeline")


class PolicyService:
    """Service ``policy_loader``."""

    name = "policy_loader"

    def __init__(self, runtime: PolicyRuntime, releases: ReleaseStore, *,
                 on_status: Callable[[str], None] | None = None) -> None:
        self.runtime = runtime
        self.releases = releases
        self.on_status = on_status
        self._lock = asyncio.Lock()
        self._failed: dict[str, str] = {}

    async def run(self) -> None:
        await self.on_releases_changed()
        await asyncio.Event().wait()

    async def reload(self, config: AgentConfig) -> None:
        """SIGHUP: policies loaded from now on get the new ``[policy]`` limits."""
        self.runtime.reconfigure(config.policy)

    async def on_releases_changed(self) -> None:
        async with self._lock:
            store = self.releases
            active = [r for r in await run_blocking(store.list) if r.kind == "policy" and r.state == "active"]
            registry = self.runtime.registry
            for rel in sorted(active, key=lambda r: r.name):
                current = registry.get(rel.name)
                mark = f"{rel.version}:{rel.sha256}"
                if (current is not None and current.version == rel.version) or self._failed.get(rel.name) == mark:
                    continue
                try:
                    artifact = await store.aartifact_bytes(rel.sha256)
                    await self.runtime.load_release(rel, artifact)
                except AgentError as exc:
                    self._failed[rel.name] = mark
                    log.error("gate_policy_load_failed", policy=rel.name, version=rel.version, error=str(exc),
                              code=exc.code)
                    await store.store.record_error("pipeline", exc.code,
                                                   f"policy '{rel.name}' v{rel.version} not loaded: {exc}")
                    continue
                self._failed.pop(rel.name, None)
                log.info("gate_policy_active", policy=rel.name, version=rel.version)
            if self.on_status is not None:
                self.on_status(f"{len(registry.names())} active")
