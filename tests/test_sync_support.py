"""Helpers of the sync tests (no tests here): an uplink consumer that de-duplicates by key, a drain child process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import aiomqtt

from tests.support.procs import REPO


class Consumer:
    """The cloud side of the uplink: a persistent QoS 1 session that counts every key it receives."""

    def __init__(self, host: str, port: int, topic: str = "edge/+/outbox/#") -> None:
        self.host = host
        self.port = port
        self.topic = topic
        self.seen: Counter[str] = Counter()
        self.by_class: dict[str, set[str]] = {}
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
                        body = json.loads(message.payload if isinstance(message.payload, bytes) else b"{}")
                        self.batches += 1
                        for rec in body["records"]:
                            self.seen[rec["key"]] += 1
                            self.by_class.setdefault(body["class"], set()).add(rec["key"])
            except aiomqtt.MqttError:
                self.connected.clear()
                await asyncio.sleep(0.2)

    async def wait_for(self, keys: set[str], timeout: float = 60) -> None:
        async def done() -> None:
            while not keys <= self.unique:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(done(), timeout)


DRAIN_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from agent.storage import Store
    from agent.sync.drain import Drainer
    from agent.config.sync import OutboxSettings

    state, url, rate = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    settings = OutboxSettings(uplink_url=url, jitter_max_s=0.0, batch_records=50, inflight=8,
                              rate_limit_records_s=rate, reconnect_max_s=0.5, publish_timeout_s=5)
    store = Store.open(state)
    async def main() -> None:
        drainer = Drainer(store, settings, "gw-1")
        task = asyncio.create_task(drainer.run())
        while True:
            await asyncio.sleep(0.05)
            if drainer.sent_records:
                print("sending", flush=True)
                break
        await task
    asyncio.run(main())
""")


def start_drain_child(state: Path, url: str, rate: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DRAIN_CHILD, str(state), url, str(rate)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
