"""The local bus: one persistent MQTT session with the gateway's own broker.

Why it looks like this (see the platform notes' data-loss traps):
- a stable client id + ``clean_session=False`` (MQTT 3.1.1): the broker queues QoS 1 messages while
  the agent is down or restarting and redelivers them;
- manual acknowledgement: a message is PUBACKed only when its handler says it is durably stored
  (``BusMessage.ack``), so a crash before the commit means redelivery, never loss. The broker's
  in-flight window then doubles as back-pressure; the incoming queue is unbounded on purpose (a
  bounded aiomqtt queue drops messages it already acknowledged);
- no built-in reconnect in aiomqtt: capped exponential backoff with jitter, re-subscribe every time.

An ack is only sent on the connection that received the message: after a reconnect the broker
redelivers whatever was not acknowledged (at-least-once; duplicates are possible, loss is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from agent.config.model import LocalBrokerSettings
from agent.errors import AgentError
from agent.logs import get_logger
from agent.messaging.manual_ack import PahoAcker, enable_manual_ack, send_ack

log = get_logger("local_bus")

LINK_NAME = "local_broker"
STABLE_SESSION_S = 10.0
OFFLINE_WARN_EVERY_S = 600.0
Handler = Callable[["BusMessage"], None]
LinkListener = Callable[[str, str], Any]


class BusUnavailable(AgentError):
    """The local broker is not connected (or did not confirm in time); the caller decides what to do."""

    code = "local_bus_unavailable"


@dataclass(eq=False)
class BusMessage:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    received_mono: float
    _bus: LocalBus | None = field(default=None, repr=False)
    _generation: int = 0
    _acked: bool = False

    def ack(self) -> bool:
        """Acknowledge to the broker (idempotent). False if the connection that got it is gone."""
        if self._acked or self._bus is None:
            return self._acked
        self._acked = True
        return self._bus._ack(self)


@dataclass
class _Route:
    topic_filter: str
    handler: Handler
    manual_ack: bool
    qos: int


def backoff_delays(first: float, cap: float, rng: random.Random | None = None) -> Any:
    """Capped exponential backoff with "equal jitter": each delay in [d/2, d], d doubling up to ``cap``."""
    r = rng or random.Random()
    d = first
    while True:
        yield d / 2 + r.random() * d / 2
        d = min(cap, d * 2)


class LocalBus:
    """Service ``local_bus``: owns the connection; others ``publish`` and ``subscribe`` through it."""

    name = "local_bus"

    def __init__(self, settings: LocalBrokerSettings, node_id: str, *,
                 on_link: LinkListener | None = None) -> None:
        self.settings = settings
        self.client_id = settings.client_id or f"edge-agent-{node_id}"
        self._routes: list[_Route] = []
        self._client: aiomqtt.Client | None = None
        self._paho: PahoAcker | None = None
        self._generation = 0
        self._connected = asyncio.Event()
        self._on_link = on_link
        self._reconnect_reason: str | None = None
        self._wake = asyncio.Event()
        self.connects = 0
        self._connects_seen = 0
        self._failures = 0
        self._last_warning = -1e9
        self.received = 0
        self.acked = 0
        self.published = 0

    # ---- API for other components -------------------------------------------------------------

    def subscribe(self, topic_filter: str, handler: Handler, *, manual_ack: bool = False, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (called on the loop, must not block).

        With ``manual_ack`` the handler must call ``msg.ack()`` once the message is safe; otherwise
        the bus acks right after the handler returns. Subscriptions are (re)made on every connect.
        """
        self._routes.append(_Route(topic_filter, handler, manual_ack, qos))
        client = self._client
        if client is not None and self._connected.is_set():
            task = asyncio.get_running_loop().create_task(client.subscribe(topic_filter, qos=qos))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, within_s: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      puback_timeout_s: float = 5.0) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK. Raises :class:`BusUnavailable`."""
        client = self._client
        if client is None or not self._connected.is_set():
            raise BusUnavailable(f"local broker {self.settings.host}:{self.settings.port} is not connected")
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=puback_timeout_s)
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"publish to '{topic}' on the local broker failed: {exc}") from exc
        self.published += 1

    def request_reconnect(self, reason: str) -> None:
        """Drop the connection (e.g. storage failed): unacked messages come back after reconnect."""
        self._reconnect_reason = reason
        self._wake.set()

    # ---- service ------------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        delays = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
        while True:
            started = time.monotonic()
            try:
                await self._session()
                detail = self._reconnect_reason or "connection closed"
            except (aiomqtt.MqttError, OSError) as exc:
                detail = str(exc) or type(exc).__name__
            finally:
                self._down()
            if time.monotonic() - started >= STABLE_SESSION_S:
                # only a session that held for a while resets the backoff: a store that keeps failing
                # (disk full) or a broker that drops us at once must not make us reconnect in a tight loop
                delays = backoff_delays(s.reconnect_min_s, s.reconnect_max_s)
            self._reconnect_reason = None
            await self._link("down", detail)
            delay = next(delays)
            self._failures = 0 if self.connects > self._connects_seen else self._failures + 1
            self._connects_seen = self.connects
            now_m = time.monotonic()
            # offline for weeks is normal: warn on the drop and every few minutes, not on every retry
            if self._failures == 0 or now_m - self._last_warning >= OFFLINE_WARN_EVERY_S:
                self._last_warning = now_m
                log.warning("local_bus_disconnected", host=s.host, port=s.port, error=detail,
                            retry_in_s=round(delay, 2), failed_attempts=self._failures)
            else:
                log.debug("local_bus_retry", host=s.host, port=s.port, error=detail, retry_in_s=round(delay, 2))
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        s = self.settings
        client = aiomqtt.Client(
            s.host, s.port, identifier=self.client_id, clean_session=False,
            protocol=aiomqtt.ProtocolVersion.V311, keepalive=s.keepalive_s,
            username=s.username or None, password=s.password or None, timeout=10.0,
            # Nagle + delayed ACK held small QoS 1 packets (PUBACKs, actuations) for tens of ms
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        client.pending_calls_threshold = 10_000  # many actuations in flight are normal, not a warning
        paho = enable_manual_ack(client)
        async with client:
            self._generation += 1
            self._client, self._paho = client, paho
            self.connects += 1
            for topic_filter, qos in self._filters():
                await client.subscribe(topic_filter, qos=qos)
            self._connected.set()
            log.info("local_bus_connected", host=s.host, port=s.port, client_id=self.client_id,
                     subscriptions=[f for f, _ in self._filters()])
            await self._link("up", f"{s.host}:{s.port} as {self.client_id}")
            reader = asyncio.create_task(self._read(client, self._generation))
            waker = asyncio.create_task(self._wake.wait())
            try:
                done, _ = await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
                if reader in done:
                    reader.result()  # raises MqttError on a lost connection
            finally:
                for t in (reader, waker):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                        await t
                self._wake.clear()
                self._connected.clear()

    def _filters(self) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        for r in self._routes:
            seen[r.topic_filter] = max(seen.get(r.topic_filter, 0), r.qos)
        return list(seen.items())

    async def _read(self, client: aiomqtt.Client, generation: int) -> None:
        async for m in client.messages:
            self.received += 1
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            msg = BusMessage(str(m.topic), payload, m.qos, m.retain, m.mid, time.monotonic(),
                             self, generation)
            route = next((r for r in self._routes if m.topic.matches(r.topic_filter)), None)
            if route is None:
                msg.ack()
                continue
            try:
                route.handler(msg)
            except Exception as exc:  # a handler bug must not kill the bus; unacked = redelivered
                log.error("local_bus_handler_failed", topic=msg.topic, error=str(exc),
                          error_type=type(exc).__name__)
                self.request_reconnect(f"handler for {route.topic_filter} failed: {exc}")
                continue
            if not route.manual_ack:
                msg.ack()

    def _ack(self, msg: BusMessage) -> bool:
        if msg._generation != self._generation or self._paho is None or not self._connected.is_set():
            return False
        ok = send_ack(self._paho, msg.mid, msg.qos)
        if ok:
            self.acked += 1
        return ok

    def _down(self) -> None:
        self._connected.clear()
        self._client = None
        self._paho = None

    async def _link(self, state: str, detail: str) -> None:
        if self._on_link is None:
            return
        try:
            result = self._on_link(state, detail)
            if asyncio.iscoroutine(result):
                await result
        except AgentError as exc:
            log.error("local_bus_link_state_failed", error=str(exc))
