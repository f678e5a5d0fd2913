"""Keeps the gate's PolicyRegistry in step with the installed (signed) policy releases.

The module runtime has its service for ``kind = "module"``; this is the same for ``kind = "policy"``:
on start and on every release change (``ctx.components["releases"]`` listener) each *active* policy
release is loaded — precompiled code from the artifact cache, bound to the artifact's sha256 — and
swapped into the registry that the pipeline's gate reads (``ctx.components["policies"]``, shared with
the fleet's swap orchestrator). A version already active in the registry is left alone, so a fleet
hot swap and this loader never fight; a release that fails to load leaves the previous version running.
"""

from __future__ import annotations

import asyncio

from agent.daemon.context import Context
from agent.errors import AgentError
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.policy.bundle import is_bundle, read_bundle
from agent.policy.engine import Policy, load_policy
from agent.policy.registry import shared_registry
from agent.wasm import codecache
from agent.wasm.engine import shared_engine

log = get_logger("pipeline")


class PolicyLoader:
    """Service ``policy_loader``."""

    name = "policy_loader"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.registry = shared_registry(ctx.components)
        self._lock = asyncio.Lock()
        self._failed: dict[str, str] = {}
        releases = ctx.components.get("releases")
        if releases is not None and hasattr(releases, "add_listener"):
            releases.add_listener(self)

    async def run(self) -> None:
        await self.on_releases_changed()
        await asyncio.Event().wait()

    def _load_blocking(self, name: str, version: int, sha256: str, artifact: bytes) -> Policy:
        wasm = read_bundle(artifact).wasm if is_bundle(artifact) else artifact
        engine = shared_engine()
        module = codecache.load_module(self.ctx.store, engine, sha256, lambda: wasm)
        return load_policy(artifact, name=name, version=version, settings=self.ctx.config.policy, module=module,
                           engine=engine)

    async def on_releases_changed(self) -> None:
        releases = self.ctx.components.get("releases")
        if releases is None:
            return
        async with self._lock:
            store = releases.releases
            active = [r for r in await run_blocking(store.list) if r.kind == "policy" and r.state == "active"]
            for rel in sorted(active, key=lambda r: r.name):
                current = self.registry.get(rel.name)
                mark = f"{rel.version}:{rel.sha256}"
                if (current is not None and current.version == rel.version) or self._failed.get(rel.name) == mark:
                    continue
                try:
                    artifact = await store.aartifact_bytes(rel.sha256)
                    policy = await run_blocking(self._load_blocking, rel.name, rel.version, rel.sha256, artifact)
                except AgentError as exc:
                    self._failed[rel.name] = mark
                    log.error("gate_policy_load_failed", policy=rel.name, version=rel.version, error=str(exc),
                              code=exc.code)
                    await self.ctx.store.record_error("pipeline", exc.code,
                                                      f"policy '{rel.name}' v{rel.version} not loaded: {exc}")
                    continue
                self._failed.pop(rel.name, None)
                self.registry.swap(rel.name, policy)
                log.info("gate_policy_active", policy=rel.name, version=rel.version)
            self.ctx.set_status("policies", f"{len(self.registry.names())} active")
