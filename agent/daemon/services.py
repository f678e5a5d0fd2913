"""Which services the daemon runs, built from the config.

Each subsystem contributes a factory; the order is the start order. Keep this the only place
that knows the whole set, so the architecture is readable in one screen.
"""

from __future__ import annotations

from agent import sync
from agent.control import service as control
from agent.daemon.context import Context, Service
from agent.fleet.service import FleetService
from agent.runtime.service import ModuleService
from agent.trust.watcher import ReleaseWatcher


def build_services(ctx: Context) -> list[Service]:
    services: list[Service] = []
    # releases first: registries (policies, modules) and the fleet link find it as ctx.components["releases"]
    releases = ReleaseWatcher(ctx)
    ctx.components["releases"] = releases
    services.append(releases)
    # workload modules: ctx.components["modules"] is the ModuleRuntime (run / offer / set_sink / registry)
    modules = ModuleService(ctx)
    ctx.components["modules"] = modules.runtime
    services.append(modules)
    # local bus + durable ingest + control loop: ctx.components["local_bus"], ["ingest"], ["pipeline"]
    services.extend(control.build(ctx))
    services.extend(sync.build(ctx))  # outbox (+ drain, + KubeEdge twins): ctx.components["outbox"]
    if ctx.config.fleet.enabled:  # fleet link: releases in, statuses out, hot swap: ctx.components["fleet"]
        services.append(FleetService(ctx))
    return services
