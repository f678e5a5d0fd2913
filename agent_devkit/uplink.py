"""The cloud side of the outbox uplink: a persistent QoS 1 session that counts every record key it receives.

Duplicates are visible (``duplicates``), losses too (``wait_for`` a set of keys): what the outbox
tests and the sync benchmark judge the drain by.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from typing import Any

import aiomqtt

from agent.sync import codec


class Consumer:
    """The cloud side of the uplink: a persistent QoS 1 session that counts every key it receives."""

    def __init__(self, host: str, port: int, topic: str = "edge/+/outbox/#") -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.seen: Counter[str] = Counter()
        self.by_class: dict[str, set[str]] = {}
        self.payloads: dict[str, Any] = {}  # key -> payload (the last copy received)
        self.batches = 0
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    @property
    def unique(self) -> set[str]:
        return set(self.seen)

    @property
    def duplicates(self) -> int:
        return sum(self.seen.values()) - len(self.seen)

    async def start(self) -> Consumer:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self.connected.wait(), 10)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with aiomqtt.Client(self.host, self.port, identifier="cloud-consumer", clean_session=False,
                                          protocol=aiomqtt.ProtocolVersion.V311,
                                          max_queued_incoming_messages=0) as client:
                    await client.subscribe(self.topic, qos=1)
                    self.connected.set()
                    async for message in client.messages:
                        body = codec.decode_message(message.payload if isinstance(message.payload, bytes) else b"{}")
                        self.batches += 1
                        for rec in body["records"]:
                            self.seen[rec["key"]] += 1
                            self.by_class.setdefault(body["class"], set()).add(rec["key"])
                            self.payloads[rec["key"]] = rec["payload"]
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    async def wait_for(self, keys: set[str], timeout: float = 60) -> None:
        async def done() -> None:
            while not keys <= self.unique:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(done(), timeout)
