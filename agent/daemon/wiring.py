"""The composition root: the one place that builds the daemon's services and connects them.

Everything is built here with constructor injection, in start order, and returned as one frozen,
typed :class:`Components`, so every seam is visible to ``mypy --strict`` and the architecture reads
in one screen. Nothing else looks components up at run time.

To add a service: build it in :func:`build` from what it needs (a setting comes from ``ctx.config``:
pass a ``lambda: ctx.config.<table>`` when it must follow SIGHUP, or add it to ``reloadables``),
give it ``on_status=status("<part>")`` if it reports a "what it is doing" phrase, and append it to
``services`` where it must start. If another component needs it, add a typed field to
:class:`Components`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.control.pipeline import Pipeline
from agent.daemon.context import Context, Reloadable, Service
from agent.daemon.releases import runnable_checks
from agent.fleet.service import FleetAgent, FleetService
from agent.messaging.bus import LINK_NAME, LocalBus
from agent.messaging.ingest import Ingest
from agent.messaging.retention import Retention
from agent.policy.runtime import PolicyRuntime
from agent.policy.service import PolicyService
from agent.runtime.modules import ModuleRuntime
from agent.runtime.service import ModuleService
from agent.sync.drain import Drainer
from agent.sync.kubeedge import TwinSync
from agent.sync.outbox import Outbox
from agent.sync.service import OutboxService
from agent.trust.releases import ReleaseStore
from agent.trust.watcher import ReleaseWatcher


@dataclass(frozen=True)
class Components:
    """What the daemon runs. ``services`` in start order; ``reloadables`` get the new config on SIGHUP."""

    releases: ReleaseWatcher
    modules: ModuleRuntime
    policies: PolicyRuntime
    local_bus: LocalBus
    ingest: Ingest
    pipeline: Pipeline
    outbox: Outbox
    fleet: FleetAgent | None
    services: tuple[Service, ...]
    reloadables: tuple[Reloadable, ...]


def build(ctx: Context) -> Components:
    """Build every service of the daemon from ``ctx`` (its config, store and status line)."""
    cfg = ctx.config
    store = ctx.store

    def status(part: str) -> Callable[[str], None]:
        return lambda text: ctx.set_status(part, text)

    # the runtimes: the one path per kind from a release to a running workload; the release store
    # is given their "can this run" checks, so it refuses exactly what they could not load
    policies = PolicyRuntime(store, cfg.policy)
    modules = ModuleRuntime(store, cfg.modules, state_dir=cfg.state_dir, handlers=ctx.handlers)
    releases = ReleaseStore(store, checkers=runnable_checks(policies, modules))
    watcher = ReleaseWatcher(releases, on_status=status("releases"))
    module_service = ModuleService(modules, releases, on_status=status("modules"))
    policy_service = PolicyService(policies, releases, on_status=status("policies"))
    watcher.add_listener(module_service)
    watcher.add_listener(policy_service)

    # the local control loop: bus → durable ingest → modules → policy gate → bus
    async def on_link(state: str, detail: str) -> None:
        ctx.set_status("local_bus", "connected" if state == "up" else "broker offline")
        await store.set_link(LINK_NAME, state, detail)

    bus = LocalBus(cfg.local_broker, cfg.node_id, on_link=on_link, handlers=ctx.handlers)
    ingest = Ingest(store, batch_max=cfg.pipeline.ingest_batch_max, max_payload_bytes=cfg.pipeline.max_payload_bytes,
                    on_store_failure=bus.request_reconnect, handlers=ctx.handlers)
    bus.subscribe_sensors(ingest.handle)
    pipeline = Pipeline(store, cfg.pipeline, cfg.node_id, publisher=bus, policies=policies.registry,
                        decision_policy=lambda: ctx.config.policy.decision_policy, audit=cfg.audit)
    ingest.add_listener(modules.offer)
    modules.set_sink(pipeline.sink)
    ctx.set_status("local_bus", "connecting")

    # store-and-forward to the cloud, KubeEdge twins
    outbox = Outbox(store.writer, cfg.outbox)
    sync_services: list[Service] = [OutboxService(store, cfg.outbox, outbox, telemetry=cfg.telemetry)]
    if cfg.outbox.uplink_url:
        sync_services.append(Drainer(store, cfg.outbox, cfg.node_id, outbox))
    if cfg.kubeedge.enabled:
        sync_services.append(TwinSync(store, cfg.kubeedge, cfg.node_id, cfg.local_broker.host, cfg.local_broker.port,
                                      handlers=ctx.handlers))

    # the fleet link: releases in, statuses out, hot swap
    fleet: FleetAgent | None = None
    fleet_services: list[Service] = []
    if cfg.fleet.enabled:
        fleet = FleetAgent(node_id=cfg.node_id, settings=cfg.fleet, releases=releases, policies=policies,
                           modules=modules, handlers=ctx.handlers)
        # now, while the services are built: no service task runs yet, so a release rolled back for a
        # crash loop is never loaded again (one short SQLite transaction per open window)
        fleet.check_watches(after_failure=ctx.after_failure)
        fleet_services.append(FleetService(fleet, on_status=status("fleet")))

    services: tuple[Service, ...] = (
        watcher, module_service, policy_service, bus, ingest, pipeline,
        Retention(store, lambda: ctx.config.pipeline, lambda: ctx.config.telemetry), *sync_services, *fleet_services)
    return Components(releases=watcher, modules=modules, policies=policies, local_bus=bus, ingest=ingest,
                      pipeline=pipeline, outbox=outbox, fleet=fleet, services=services,
                      reloadables=(module_service, policy_service, bus))
