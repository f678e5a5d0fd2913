"""The daemon's fleet service: link + receiver + swap orchestrator + status reporter, wired together.

Finds what it needs in ``ctx.components`` at start: ``releases`` (the ReleaseWatcher; its
ReleaseStore is the one verification path), ``policies`` (the PolicyRegistry, or a service
exposing ``.registry``) and ``modules`` (the ModuleRuntime). Missing parts make the matching
releases rejected with a clear code rather than the service failing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.daemon.context import Context
from agent.fleet.health import HealthRules
from agent.fleet.link import FleetLink, LinkConfig
from agent.fleet.receiver import ReleaseReceiver
from agent.fleet.reporter import StatusReporter
from agent.fleet.settings import FleetSettings
from agent.fleet.swap import SwapOrchestrator
from agent.fleet.topics import Topics
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.policy.registry import PolicyRegistry, shared_registry
from agent.runtime.modules import ModuleRuntime
from agent.storage.db import connect_reader
from agent.trust.releases import ReleaseStore

log = get_logger("fleet")

# after a (re)connect, installs wait this long so the burst of retained + queued releases coalesces
CONNECT_SETTLE_S = 0.3
# rejections worth retrying after a restart (the trust store or the clock may have been fixed)
_PERMANENT = ("active", "rolled_back", "superseded")


def link_config(settings: FleetSettings, node_id: str) -> LinkConfig:
    return LinkConfig(url=settings.url, client_id=settings.client_id or f"edge-fleet-{node_id}",
                      username=settings.username, password=settings.password, tls_ca=settings.tls_ca,
                      tls_cert=settings.tls_cert, tls_key=settings.tls_key, keepalive_s=settings.keepalive_s,
                      reconnect_min_s=settings.reconnect_min_s, reconnect_max_s=settings.reconnect_max_s)


def health_rules(settings: FleetSettings) -> HealthRules:
    return HealthRules(window_s=settings.health_window_s, min_evals=settings.health_min_evals,
                       max_traps=settings.health_max_traps, max_error_rate=settings.health_max_error_rate,
                       max_latency_ratio=settings.health_max_latency_ratio)


def load_memory(db_path: Path) -> tuple[set[tuple[str, str, int, str]], list[tuple[str, str, str]]]:
    """(deliveries already settled, stored statuses to re-publish) from the fleet tables."""
    conn = connect_reader(db_path)
    try:
        marks = ",".join("?" * len(_PERMANENT))
        seen = {(str(k), str(n), int(v), str(s)) for k, n, v, s in conn.execute(
            f"SELECT kind, name, version, sha256 FROM fleet_releases WHERE state IN ({marks})", _PERMANENT)}
        statuses = [(str(k), str(n), str(p)) for k, n, p in
                    conn.execute("SELECT kind, name, payload FROM fleet_status ORDER BY kind, name")]
    except sqlite3.OperationalError:
        return set(), []
    finally:
        conn.close()
    return seen, statuses


class FleetAgent:
    """Everything of the fleet side of one gateway, independent of the daemon (tests, benchmarks)."""

    def __init__(self, *, node_id: str, settings: FleetSettings, releases: ReleaseStore,
                 policies: PolicyRegistry, modules: ModuleRuntime | None = None,
                 policy_settings: Any = None) -> None:
        self.node_id = node_id
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.releases = releases
        self.reporter = StatusReporter(node_id, self.topics, releases.store.writer)
        self.swap = SwapOrchestrator(node_id=node_id, releases=releases, policies=policies, reporter=self.reporter,
                                     rules=health_rules(settings), shadow_inputs=settings.shadow_inputs,
                                     policy_settings=policy_settings, modules=modules)
        self.receiver = ReleaseReceiver(node_id=node_id, site=settings.site, groups=tuple(settings.groups),
                                        topics=self.topics, max_bytes=settings.max_release_bytes,
                                        handler=self.swap, reporter=self.reporter)
        self.swap.has_newer = self.receiver.has_pending
        self.link = FleetLink(link_config(settings, node_id), subscriptions=self.receiver.filters(),
                              presence_topic=self.topics.presence(node_id), on_message=self.receiver.on_message,
                              on_state=self._on_link_state)
        self.reporter.publish = lambda topic, payload: self.link.publish(topic, payload, retain=True)
        # the daemon's STATUS= line (sd_notify / status "doing"); None outside the daemon
        self.on_status: Callable[[str], None] | None = None

    async def _on_link_state(self, state: str, detail: str) -> None:
        if state == "up":
            self.receiver.settle(CONNECT_SETTLE_S)
        if self.on_status is not None:
            self.on_status("connected" if state == "up" else "broker offline")
        await self.releases.store.set_link("fleet", state, detail)

    async def run(self) -> None:
        seen, statuses = await run_blocking(load_memory, self.releases.store.path)
        self.receiver.seen.update(seen)
        await self.reporter.republish(statuses)
        log.info("fleet_started", node_id=self.node_id, url=self.settings.url, filters=self.receiver.filters(),
                 remembered=len(seen))
        try:
            await self.link.run()
        finally:
            await self.receiver.close()
            await self.reporter.close()


class FleetService:
    """The daemon service (``[fleet] enabled = true``)."""

    name = "fleet"

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        ctx = self.ctx
        watcher = ctx.components.get("releases")
        releases = getattr(watcher, "releases", None)
        if not isinstance(releases, ReleaseStore):
            releases = ReleaseStore(ctx.store)
        runtime = ctx.components.get("modules")
        agent = FleetAgent(node_id=ctx.config.node_id, settings=ctx.config.fleet, releases=releases,
                           policies=shared_registry(ctx.components),
                           modules=runtime if isinstance(runtime, ModuleRuntime) else None,
                           policy_settings=ctx.config.policy)
        ctx.components["fleet"] = agent
        ctx.set_status("fleet", "connecting")
        agent.on_status = lambda text: ctx.set_status("fleet", text)
        await agent.run()
