"""Which services the daemon runs, built from the config.

Each subsystem contributes a factory; the order is the start order. Keep this the only place
that knows the whole set, so the architecture is readable in one screen.
"""

from __future__ import annotations

from agent.daemon.context import Context, Service


def build_services(ctx: Context) -> list[Service]:
    services: list[Service] = []
    return services
