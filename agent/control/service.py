"""Wiring of the local control loop into the daemon: bus → ingest → modules → pipeline → bus.

Shared components (other services find them in ``ctx.components``):
- ``local_bus``: :class:`~agent.messaging.bus.LocalBus` (``publish``/``subscribe``);
- ``ingest``: :class:`~agent.messaging.ingest.Ingest` (``add_listener`` for committed readings);
- ``pipeline``: :class:`~agent.control.pipeline.Pipeline` (the module runtime's output sink).
"""

from __future__ import annotations

from typing import Any

from agent.control.pipeline import Pipeline
from agent.control.policies import PolicyLoader
from agent.daemon.context import Context, Service
from agent.messaging.bus import LINK_NAME, LocalBus
from agent.messaging.ingest import Ingest
from agent.messaging.retention import Retention


class _Policies:
    """The policy registry as published by the policy service, looked up at decision time."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def _registry(self) -> Any:
        return self.ctx.components.get("policies")

    def get(self, name: str) -> Any:
        reg = self._registry()
        return None if reg is None else reg.get(name)

    def names(self) -> list[str]:
        reg = self._registry()
        return [] if reg is None else list(reg.names())


def build(ctx: Context) -> list[Service]:
    cfg = ctx.config

    async def on_link(state: str, detail: str) -> None:
        ctx.set_status("local_bus", "connected" if state == "up" else "broker offline")
        await ctx.store.set_link(LINK_NAME, state, detail)

    bus = LocalBus(cfg.local_broker, cfg.node_id, on_link=on_link)
    ingest = Ingest(ctx.store, batch_max=cfg.pipeline.ingest_batch_max,
                    max_payload_bytes=cfg.pipeline.max_payload_bytes, on_store_failure=bus.request_reconnect)
    bus.subscribe_sensors(ingest.handle)
    loader = PolicyLoader(ctx)  # active policy releases → ctx.components["policies"] (the gate's registry)
    pipeline = Pipeline(ctx.store, cfg.pipeline, cfg.node_id, publisher=bus, policies=_Policies(ctx),
                        decision_policy=lambda: ctx.config.policy.decision_policy)
    modules = ctx.components.get("modules")
    if modules is not None:
        ingest.add_listener(modules.offer)
        modules.set_sink(pipeline.sink)
    ctx.components["local_bus"] = bus
    ctx.components["ingest"] = ingest
    ctx.components["pipeline"] = pipeline
    ctx.set_status("local_bus", "connecting")
    return [loader, bus, ingest, pipeline, Retention(ctx.store, lambda: ctx.config.pipeline)]
