"""Draining the outbox to the uplink broker: pipelined QoS 1 batches, rate-limited, resumable.

Delivery contract (at-least-once + idempotency keys = exactly-once after the consumer de-duplicates):
- a batch is one MQTT message holding up to ``batch_records`` records of one class, each with its
  idempotency ``key``; up to ``inflight`` batches are unacknowledged at once;
- a record's row is deleted only in the write transaction that follows the broker's PUBACK of its
  batch, so the rows left in ``outbox`` are exactly the resumable cursor: after a SIGKILL, a broker
  restart or a lost link, draining restarts from the oldest row left and at most the batches that
  were in flight are sent twice (same keys);
- classes drain in priority order (control, audit, events, telemetry), rows in insertion order;
- before a batch is published its rows are *handed out* (``outbox_classes.handed_id``) in a write job
  that also checks they are all still there: the disk budget never merges or drops a handed-out row,
  so a record is either delivered or shed (with a gap record), never both;
- the message is format v2: one zstandard frame of the JSON batch (``codec.py``, ``docs/design.md``).

The link is probed by connecting (capped exponential backoff with jitter); once it is up we wait a
random ``0..jitter_max_s`` before draining so a fleet coming back together does not storm the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import aiomqtt
import sqlite_utils

from agent import clock
from agent.clock import Stamp
from agent.config.sync import OutboxSettings
from agent.errors import AgentError
from agent.logs import get_logger
from agent.messaging.backoff import Backoff
from agent.offload import run_blocking
from agent.storage import Store
from agent.storage.db import connect_reader
from agent.sync import codec
from agent.sync.outbox import Outbox, OutboxClass

log = get_logger("outbox")


class UplinkConfigError(AgentError):
    code = "uplink_config_invalid"


@dataclass
class Batch:
    cls: OutboxClass
    first_id: int
    last_id: int
    count: int
    payload: bytes


def parse_url(url: str) -> tuple[str, int, bool]:
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
        raise UplinkConfigError(f"outbox.uplink_url {url!r} must look like mqtt://host:port or mqtts://host:port")
    tls = parsed.scheme == "mqtts"
    return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


def hand_out_job(batches: list[Batch]) -> Callable[[sqlite_utils.Database], int]:
    """Mark the batches' rows as handed to the broker, after checking each batch is still complete (the
    budget may have merged or dropped rows since they were read). Returns how many batches are good:
    the leading ones; the rest must be read again."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        good = 0
        for batch in batches:
            n = conn.execute("SELECT count(*) FROM outbox WHERE cls = ? AND id BETWEEN ? AND ?",
                             (int(batch.cls), batch.first_id, batch.last_id)).fetchone()[0]
            if n != batch.count:
                break
            conn.execute("UPDATE outbox_classes SET handed_id = max(handed_id, ?) WHERE cls = ?",
                         (batch.last_id, int(batch.cls)))
            good += 1
        return good
    return job


def ack_job(cls: OutboxClass, first_id: int, last_id: int) -> Callable[[sqlite_utils.Database], int]:
    """Delete an acknowledged batch's rows and count them as sent (rows degraded meanwhile are skipped)."""
    def job(db: sqlite_utils.Database) -> int:
        conn = db.conn
        n, size = conn.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM outbox WHERE cls = ? AND id BETWEEN ? "
                               "AND ?", (int(cls), first_id, last_id)).fetchone()
        conn.execute("DELETE FROM outbox WHERE cls = ? AND id BETWEEN ? AND ?", (int(cls), first_id, last_id))
        conn.execute("UPDATE outbox_classes SET rows = rows - ?, bytes = bytes - ?, sent = sent + ?, "
                     "acked_id = max(acked_id, ?) WHERE cls = ?", (n, size, n, last_id, int(cls)))
        return int(n)
    return job


class BatchReader:
    """Reads the next batches from its own read-only connection (runs on the offload pool)."""

    def __init__(self, store: Store, settings: OutboxSettings, node_id: str, now: clock.Clock) -> None:
        self.path = store.path
        self.settings = settings
        self.node_id = node_id
        self.now = now
        self._conn: Any = None
        # read() runs on the offload pool; close() may come from the loop while a read is still
        # running there (a cancelled await does not stop the thread): never let the two overlap
        self._lock = threading.Lock()
        self._boots: dict[int, str] = {}
        self.cursor: dict[OutboxClass, int] = {}

    def reset(self) -> None:
        """Forget what was handed out: unacknowledged rows are read again (after a reconnect)."""
        self.cursor = dict.fromkeys(OutboxClass, 0)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def read(self, max_batches: int) -> list[Batch]:
        with self._lock:
            return self._read(max_batches)

    def _read(self, max_batches: int) -> list[Batch]:
        if self._conn is None:
            self._conn = connect_reader(self.path)
        conn = self._conn
        conn.execute("BEGIN")
        try:
            out: list[Batch] = []
            for cls in OutboxClass:
                while len(out) < max_batches:
                    rows = conn.execute("SELECT id, key, payload, wall, boot, mono, enc FROM outbox "
                                        "WHERE cls = ? AND id > ? ORDER BY id LIMIT ?",
                                        (int(cls), self.cursor[cls], self.settings.batch_records)).fetchall()
                    if not rows:
                        break
                    out.append(self._encode(cls, rows))
                    self.cursor[cls] = out[-1].last_id
                if len(out) >= max_batches:
                    break
            return out
        finally:
            conn.execute("COMMIT")

    def _boot_id(self, seq: int) -> str:
        name = self._boots.get(seq)
        if name is None:
            row = self._conn.execute("SELECT boot_id FROM outbox_boots WHERE seq = ?", (seq,)).fetchone()
            name = self._boots[seq] = str(row[0]) if row else f"unknown-{seq}"
        return name

    def _encode(self, cls: OutboxClass, rows: list[Any]) -> Batch:
        now = self.now()
        parts: list[str] = []
        size = 0
        last = rows[0][0]
        count = 0
        for rid, key, payload, wall, boot, mono, enc in rows:
            boot_id = self._boot_id(int(boot))
            est = clock.best_wall(Stamp(wall, boot_id, mono), now)
            west = "null" if est is None else f"{est:.3f}"
            text = codec.unpack(payload, int(enc))
            part = (f'{{"key":{json.dumps(key)},"seq":{rid},"boot":"{boot_id}","mono":{mono:.3f},'
                    f'"wall":{wall:.3f},"wall_est":{west},"payload":{text}}}')
            if count and size + len(part) > self.settings.batch_max_bytes:
                break
            parts.append(part)
            size += len(part) + 1
            last = rid
            count += 1
        node = json.dumps(self.node_id)
        head = f'{{"v":2,"node":{node},"class":"{cls.label}","sent_at":{time.time():.3f},"records":['
        return Batch(cls, int(rows[0][0]), int(last), count,
                     codec.compress((head + ",".join(parts) + "]}").encode()))


class TokenBucket:
    """Records per second; starts empty so a reconnect does not begin with a one-second burst."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 0.0
        self.stamp = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        while True:
            now = time.monotonic()
            self.tokens = min(self.rate, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= n or self.tokens >= self.rate:
                self.tokens -= n
                return
            await asyncio.sleep((n - self.tokens) / self.rate)


def _settle(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here; the drain loop re-raises it from ``failure``
    return done


class Drainer:
    """The ``outbox-drain`` service: connect, wait a jitter, drain, repeat after any link loss."""

    name = "outbox-drain"

    def __init__(self, store: Store, settings: OutboxSettings, node_id: str, outbox: Outbox | None = None, *,
                 now: clock.Clock = clock.now, rng: random.Random | None = None) -> None:
        self.store = store
        self.settings = settings
        self.node_id = node_id
        self.outbox = outbox
        self.rng = rng or random.Random()
        self.reader = BatchReader(store, settings, node_id, now)
        self.host, self.port, self.tls = parse_url(settings.uplink_url)
        self.client_id = settings.uplink_client_id or f"edge-agent-{node_id}-outbox"
        self.sent_records = 0
        self.sent_batches = 0
        self.connects = 0
        self.peak_inflight = 0  # most batches seen unacknowledged at once (pipelining at work)
        self.idle = asyncio.Event()

    def topic(self, cls: OutboxClass) -> str:
        return self.settings.uplink_topic.replace("{node_id}", self.node_id).replace("{class}", cls.label)

    def _client(self) -> aiomqtt.Client:
        s = self.settings
        return aiomqtt.Client(
            self.host, self.port, identifier=self.client_id, clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311, keepalive=s.keepalive_s, timeout=s.publish_timeout_s,
            username=s.uplink_username or None, password=s.uplink_password or None,
            max_inflight_messages=s.inflight, max_queued_outgoing_messages=0,
            tls_context=ssl.create_default_context() if self.tls else None)

    async def run(self) -> None:
        backoff = Backoff(1.0, self.settings.reconnect_max_s, rng=self.rng)
        try:
            while True:
                delay = backoff.next()
                try:
                    async with self._client() as client:
                        self.connects += 1
                        backoff.reset()
                        delay = backoff.next()
                        await self.store.set_link("uplink", "up", f"{self.host}:{self.port}")
                        jitter = self.rng.uniform(0, self.settings.jitter_max_s)
                        log.info("uplink_connected", host=self.host, port=self.port, jitter_s=round(jitter, 2))
                        await asyncio.sleep(jitter)
                        await self._drain(client)
                except aiomqtt.MqttError as exc:
                    self.idle.clear()
                    log.warning("uplink_down", host=self.host, port=self.port, error=str(exc),
                                retry_in_s=round(delay, 1))
                    await self.store.set_link("uplink", "down", f"{self.host}:{self.port}: {exc}")
                await asyncio.sleep(delay)
        finally:
            self.reader.close()

    async def _drain(self, client: aiomqtt.Client) -> None:
        self.reader.reset()
        bucket = TokenBucket(self.settings.rate_limit_records_s)
        window = asyncio.Semaphore(self.settings.inflight)
        inflight: set[asyncio.Task[None]] = set()
        failure: list[BaseException] = []

        async def send(batch: Batch) -> None:
            try:
                await client.publish(self.topic(batch.cls), batch.payload, qos=1)
                await self.store.writer.run(ack_job(batch.cls, batch.first_id, batch.last_id))
                self.sent_records += batch.count
                self.sent_batches += 1
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                window.release()

        try:
            while True:
                if failure:
                    raise failure[0]
                batches = await run_blocking(self.reader.read, self.settings.inflight * 2)
                if batches:
                    good = await self.store.writer.run(hand_out_job(batches))
                    if good < len(batches):
                        # shed by the budget since they were read: read those classes again from there
                        for batch in batches[good:]:
                            self.reader.cursor[batch.cls] = min(self.reader.cursor[batch.cls], batch.first_id - 1)
                        batches = batches[:good]
                        if not batches:
                            continue
                if not batches:
                    if inflight:
                        await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                        continue
                    self.idle.set()
                    await self._wait_for_work()
                    self.idle.clear()
                    continue
                for batch in batches:
                    await bucket.take(batch.count)
                    await window.acquire()
                    if failure:
                        window.release()
                        raise failure[0]
                    task = asyncio.create_task(send(batch))
                    inflight.add(task)
                    self.peak_inflight = max(self.peak_inflight, len(inflight))
                    task.add_done_callback(_settle(inflight))
        finally:
            for task in list(inflight):
                task.cancel()
            for task in list(inflight):
                with contextlib.suppress(BaseException):
                    await task

    async def _wait_for_work(self) -> None:
        if self.outbox is None:
            await asyncio.sleep(1.0)
            return
        self.outbox.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.outbox.changed.wait(), timeout=1.0)
