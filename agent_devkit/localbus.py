"""Helpers for the local-bus / pipeline tests (issue 5): a broker that really persists, publishers.

When tests run as root, Mosquitto drops to user ``mosquitto`` and cannot write pytest's 0700 tmp
dir: persistence silently does nothing and a restart loses every session. ``user root`` keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import aiomqtt

from agent_devkit.broker import Broker, running_broker


def persistence_conf(extra: str = "") -> str:
    """The shared broker fixture now persists as root too (see agent_devkit/broker.py)."""
    return extra


@contextlib.contextmanager
def persistent_broker(workdir: Path, extra: str = "") -> Iterator[Broker]:
    with running_broker(workdir, extra_conf=persistence_conf(extra)) as b:
        yield b


async def publish_counted(host: str, port: int, items: list[tuple[str, bytes]], *, client_id: str,
                          in_flight: int = 50, stop_on_error: bool = True) -> list[int]:
    """Publish QoS 1 with several in flight; return the indexes the broker PUBACKed."""
    acked: list[int] = []
    sem = asyncio.Semaphore(in_flight)

    async def one(client: aiomqtt.Client, i: int) -> None:
        async with sem:
            topic, payload = items[i]
            try:
                await client.publish(topic, payload, qos=1, timeout=5)
            except aiomqtt.MqttError:
                return
            acked.append(i)

    try:
        async with aiomqtt.Client(host, port, identifier=client_id, max_inflight_messages=in_flight) as c:
            await asyncio.gather(*(one(c, i) for i in range(len(items))))
    except aiomqtt.MqttError:
        if not stop_on_error:
            raise
    return acked
