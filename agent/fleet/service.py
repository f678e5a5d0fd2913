"""The daemon's fleet service: link + receiver + swap orchestrator + status reporter, wired together.

:class:`FleetAgent` is given what it needs by the composition root: the release store (the one
verification path), the policy runtime and the module runtime (None: module releases are rejected
with a clear code rather than the service failing).

Health windows survive restarts (:mod:`agent.fleet.watches`): the service settles the open ones while
it is *built* — before any service task runs, so before the policy loader or the module service can
load a crash-looping release — and resumes the rest once it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.config.fleet import FleetSettings
from agent.errors import AgentError, StorageError
from agent.fleet.health import HealthRules
from agent.fleet.link import FleetLink, LinkConfig
from agent.fleet.receiver import ReleaseReceiver
from agent.fleet.registry import PullSettings, RegistryPuller, StoreLedger, parse_doorbell
from agent.fleet.reporter import StatusReporter
from agent.fleet.slots import ModuleSlot, PolicySlot, Slot
from agent.fleet.swap import SwapOrchestrator
from agent.fleet.topics import Topics, gateway_scopes
from agent.fleet.watches import Watch, check_at_start
from agent.handlers import Handlers
from agent.logs import get_logger
from agent.messaging.backoff import Backoff
from agent.oci.client import RegistryClient, RegistryConfig
from agent.offload import run_blocking
from agent.policy.runtime import PolicyRuntime
from agent.runtime.modules import ModuleRuntime
from agent.storage.db import connect_reader, table_exists
from agent.trust.releases import ReleaseStore

log = get_logger("fleet")

# after a (re)connect, installs wait this long so the burst of retained + queued releases coalesces
CONNECT_SETTLE_S = 0.3
MEMORY_RETRY_MAX_S = 30.0
# rejections worth retrying after a restart (the trust store or the clock may have been fixed)
_PERMANENT = ("active", "rolled_back", "superseded")


def link_config(settings: FleetSettings, node_id: str) -> LinkConfig:
    return LinkConfig(url=settings.url, client_id=settings.client_id or f"edge-fleet-{node_id}",
                      username=settings.username, password=settings.password, tls_ca=settings.tls_ca,
                      tls_cert=settings.tls_cert, tls_key=settings.tls_key, keepalive_s=settings.keepalive_s,
                      reconnect_min_s=settings.reconnect_min_s, reconnect_max_s=settings.reconnect_max_s)


def registry_config(settings: FleetSettings) -> RegistryConfig:
    return RegistryConfig(url=settings.registry, mirror=settings.registry_mirror, username=settings.registry_username,
                          password=settings.registry_password, token=settings.registry_token, ca=settings.registry_ca)


def pull_settings(settings: FleetSettings) -> PullSettings:
    return PullSettings(repo_prefix=settings.registry_prefix, poll_s=settings.registry_poll_s,
                        doorbell_jitter_s=settings.registry_doorbell_jitter_s,
                        max_bytes=settings.max_release_bytes)


def health_rules(settings: FleetSettings) -> HealthRules:
    return HealthRules(window_s=settings.health_window_s, min_evals=settings.health_min_evals,
                       max_traps=settings.health_max_traps, max_error_rate=settings.health_max_error_rate,
                       max_latency_ratio=settings.health_max_latency_ratio)


def load_memory(db_path: Path) -> tuple[set[tuple[str, str, int, str]], list[tuple[str, str, str]]]:
    """(deliveries already settled, stored statuses to re-publish) from the fleet tables.

    A schema without the fleet tables has nothing to remember; a database that cannot be read raises:
    an empty memory would re-install every retained release as if it were new."""
    conn = connect_reader(db_path, stale_ok=False)
    try:
        if not (table_exists(conn, "fleet_releases") and table_exists(conn, "fleet_status")):
            return set(), []
        marks = ",".join("?" * len(_PERMANENT))
        seen = {(str(k), str(n), int(v), str(s)) for k, n, v, s in conn.execute(
            f"SELECT kind, name, version, sha256 FROM fleet_releases WHERE state IN ({marks})", _PERMANENT)}
        statuses = [(str(k), str(n), str(p)) for k, n, p in
                    conn.execute("SELECT kind, name, payload FROM fleet_status ORDER BY kind, name")]
    finally:
        conn.close()
    return seen, statuses


def _log_resume_failure(task: asyncio.Task[str]) -> None:
    """A resumed window that failed (storage, a bug) stays open: the next start resumes it again."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("fleet_watch_resume_failed", task=task.get_name(), error=repr(exc))


class FleetAgent:
    """Everything of the fleet side of one gateway, independent of the daemon (tests, benchmarks)."""

    def __init__(self, *, node_id: str, settings: FleetSettings, releases: ReleaseStore,
                 policies: PolicyRuntime, modules: ModuleRuntime | None = None,
                 handlers: Handlers | None = None) -> None:
        self.node_id = node_id
        self.settings = settings
        self.topics = Topics(settings.topic_prefix)
        self.releases = releases
        self.reporter = StatusReporter(node_id, self.topics, releases.store.writer)
        rules = health_rules(settings)
        slots: dict[str, Slot[Any]] = {"policy": PolicySlot(policies, releases, shadow_inputs=settings.shadow_inputs,
                                                            min_evals=rules.min_evals)}
        if modules is not None:
            slots["module"] = ModuleSlot(modules, releases)
        self.swap = SwapOrchestrator(node_id=node_id, releases=releases, slots=slots, reporter=self.reporter,
                                     rules=rules)
        self.receiver = ReleaseReceiver(node_id=node_id, site=settings.site, groups=tuple(settings.groups),
                                        topics=self.topics, max_bytes=settings.max_release_bytes,
                                        handler=self.swap, reporter=self.reporter)
        self.swap.has_newer = self.receiver.has_pending
        subscriptions = self.receiver.filters()
        self.puller: RegistryPuller | None = None
        if settings.registry:
            # releases from an OCI registry: signed desired state per scope, MQTT only rings the doorbell
            client = RegistryClient(registry_config(settings),
                                    downloads=asyncio.Semaphore(settings.registry_pull_concurrency))
            self.puller = RegistryPuller(
                node_id=node_id, scopes=gateway_scopes(node_id, settings.site, tuple(settings.groups)),
                client=client, ledger=StoreLedger(releases), receiver=self.receiver, settings=pull_settings(settings),
                work_dir=releases.store.path.parent / "downloads",
                on_state=lambda state, detail: releases.store.set_link("registry", state, detail))
            subscriptions += self.topics.doorbell_filters(node_id, settings.site, tuple(settings.groups))
        self._link: FleetLink | None = None
        if settings.url:
            self._link = FleetLink(link_config(settings, node_id), subscriptions=subscriptions,
                                  presence_topic=self.topics.presence(node_id), on_message=self._on_message,
                                  on_state=self._on_link_state,
                                  handlers=handlers if handlers is not None else Handlers(releases.store.rejects))
            link = self._link
            self.reporter.publish = lambda topic, payload: link.publish(topic, payload, retain=True)
        # the daemon's STATUS= line (sd_notify / status "doing"); None outside the daemon
        self.on_status: Callable[[str], None] | None = None
        # open health windows to resume (None: not checked yet — run() does it)
        self.resumable: list[Watch] | None = None
        self._resumed: list[asyncio.Task[str]] = []

    @property
    def link(self) -> FleetLink:
        """The fleet broker link (absent only with a registry and no broker URL)."""
        if self._link is None:
            raise AgentError("this gateway has no fleet broker link ([fleet] url is empty)", code="fleet_no_link")
        return self._link

    def check_watches(self, after_failure: bool = True) -> list[Watch]:
        """Count this start in every open health window; roll back crash loops; keep the rest to resume.

        Blocking, and meant to run before anything loads releases (the daemon: while building services).
        A failure here is logged and recorded, never fatal: the releases stay as they are."""
        try:
            self.resumable = check_at_start(self.releases, node_id=self.node_id, window_s=self.settings.health_window_s,
                                            max_starts=self.settings.max_starts_in_health_window,
                                            after_failure=after_failure)
        except Exception as exc:  # never let this check stop the daemon from starting (that would loop)
            log.error("fleet_watch_check_failed", error=str(exc), error_type=type(exc).__name__)
            with contextlib.suppress(Exception):
                self.releases.store.record_error_sync("fleet", "fleet_watch_check_failed",
                                                      f"the health windows open at start were not checked: {exc}")
            self.resumable = []
        return self.resumable

    async def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Doorbells to the registry puller (a hint to look now), everything else to the receiver."""
        if self.puller is not None and topic.startswith(f"{self.topics.prefix}/desired/"):
            bell = parse_doorbell(self.topics.prefix, topic, payload)
            if bell is not None:
                self.puller.on_doorbell(bell)
            return
        await self.receiver.on_message(topic, payload, retained)

    async def _on_link_state(self, state: str, detail: str) -> None:
        if state == "up":
            self.receiver.settle(CONNECT_SETTLE_S)
            if self.puller is not None:
                self.puller.on_connect()
        if self.on_status is not None:
            self.on_status("connected" if state == "up" else "broker offline")
        await self.releases.store.set_link("fleet", state, detail)

    async def _memory(self) -> tuple[set[tuple[str, str, int, str]], list[tuple[str, str, str]]]:
        """What the fleet side remembers, read before the link starts. While the database cannot be read
        the link does not start: retrying is right, forgetting (and re-installing everything) is not."""
        backoff = Backoff(1.0, MEMORY_RETRY_MAX_S)
        while True:
            try:
                return await run_blocking(load_memory, self.releases.store.path)
            except (StorageError, sqlite3.Error) as exc:
                delay = backoff.next()
                log.error("fleet_memory_unreadable", error=str(exc), retry_in_s=round(delay, 1))
                if self.on_status is not None:
                    self.on_status("waiting: the state database cannot be read")
                await asyncio.sleep(delay)

    async def run(self) -> None:
        if self.resumable is None:
            await run_blocking(self.check_watches)
        seen, statuses = await self._memory()
        self.receiver.seen.update(seen)
        await self.reporter.republish(statuses)
        log.info("fleet_started", node_id=self.node_id, url=self.settings.url, registry=self.settings.registry or None,
                 filters=self.receiver.filters(),
                 remembered=len(seen), resumed_watches=len(self.resumable or []))
        self._resumed = [asyncio.create_task(self.swap.resume(w), name=f"fleet-watch-{w.kind}-{w.name}")
                         for w in self.resumable or []]
        for task in self._resumed:
            task.add_done_callback(_log_resume_failure)
        self.resumable = []
        try:
            parts = [p.run() for p in (self._link, self.puller) if p is not None]
            if not parts:
                log.error("fleet_nothing_to_run", note="[fleet] enabled with neither url nor registry")
            await asyncio.gather(*parts) if parts else asyncio.Event().wait()
        finally:
            for task in self._resumed:
                task.cancel()
            await asyncio.gather(*self._resumed, return_exceptions=True)
            await self.receiver.close()
            await self.reporter.close()
            if self.puller is not None:
                await self.puller.client.aclose()


class FleetService:
    """The daemon service (``[fleet] enabled = true``): runs the :class:`FleetAgent` the composition
    root built (and whose open health windows it settled before any service task started)."""

    name = "fleet"

    def __init__(self, agent: FleetAgent, *, on_status: Callable[[str], None] | None = None) -> None:
        self.agent = agent
        self.on_status = on_status

    async def run(self) -> None:
        if self.on_status is not None:
            self.on_status("connecting")
        self.agent.on_status = self.on_status
        await self.agent.run()
