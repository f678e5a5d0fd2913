"""Store-and-forward to the cloud (outbox + drain) and KubeEdge device-twin sync."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.daemon.context import Context, Service


def build(ctx: Context) -> list[Service]:
    """The sync services: the outbox (always), its drain (with an uplink_url), the twin sync (if enabled).

    The :class:`~agent.sync.outbox.Outbox` is shared as ``ctx.components["outbox"]`` for producers.
    """
    from agent.sync.drain import Drainer
    from agent.sync.kubeedge import TwinSync
    from agent.sync.outbox import Outbox
    from agent.sync.service import OutboxService

    cfg = ctx.config
    outbox = Outbox(ctx.store.writer, cfg.outbox)
    ctx.components["outbox"] = outbox
    services: list[Service] = [OutboxService(ctx.store, cfg.outbox, outbox)]
    if cfg.outbox.uplink_url:
        services.append(Drainer(ctx.store, cfg.outbox, cfg.node_id, outbox))
    if cfg.kubeedge.enabled:
        services.append(TwinSync(ctx.store, cfg.kubeedge, cfg.node_id, cfg.local_broker.host, cfg.local_broker.port))
    return services
