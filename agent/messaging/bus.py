"""The local bus: one persistent MQTT session with the gateway's own broker.

Why it looks like this (general-purpose MQTT clients acknowledge on receipt and lose what they
queued; docs/design.md, "Durable ingest"):
- a stable client id + ``clean_session=False`` (MQTT 3.1.1): the broker queues QoS 1 messages while
  the agent is down or restarting and redelivers them;
- manual acknowledgement: a message is PUBACKed only when its handler says it is durably stored
  (``BusMessage.ack``), so a crash before the commit means redelivery, never loss. The broker's
  in-flight window then doubles as back-pressure;
- the wire is spoken by the agent's own small MQTT 3.1.1 connection (``connection.py``): this link
  carries every reading and actuation, and a general-purpose client cost half the event loop;
- capped exponential backoff with jitter between connects, re-subscribe every time.

An ack is only sent on the connection that received the message: after a reconnect the broker
redelivers whatever was not acknowledged (at-least-once; duplicates are possible, loss is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig, LocalBrokerSettings
from agent.errors import AgentError
from agent.handlers import FAILED, Handler, Handlers
from agent.logs import get_logger
from agent.messaging import topics
from agent.messaging.backoff import Backoff
from agent.messaging.connection import MqttConnection, MqttError, open_connection
from agent.messaging.wire import Publish

log = get_logger("local_bus")

LINK_NAME = "local_broker"
STABLE_SESSION_S = 10.0
OFFLINE_WARN_EVERY_S = 600.0
MessageHandler = Callable[["BusMessage"], None]
LinkListener = Callable[[str, str], Awaitable[None]]
ROUTE_CACHE_MAX = 4096
CONNECT_TIMEOUT_S = 10.0


class BusUnavailable(AgentError):
    """The local broker is not connected (or did not confirm in time); the caller decides what to do."""

    code = "local_bus_unavailable"


class PublishRefused(AgentError):
    """What was asked cannot be published (a wildcard in the topic, QoS 2, a topic over 64 KiB)."""

    code = "local_bus_publish_refused"


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
    size: int = -1  # the payload's real size when the bus kept only its head (oversize message)

    @property
    def truncated(self) -> bool:
        return self.size > len(self.payload)

    def ack(self) -> bool:
        """Acknowledge to the broker (idempotent). False if the connection that got it is gone."""
        if self._acked or self._bus is None:
            return self._acked
        self._acked = True
        return self._bus._ack(self)  # noqa: SLF001 - a message and its bus are one unit (acks are per connection)


@dataclass
class _Route:
    topic_filter: str
    handler: MessageHandler
    manual_ack: bool
    qos: int
    entry: Handler  # the guarded entry in the daemon's handler registry


class LocalBus:
    """Service ``local_bus``: owns the connection; others ``publish`` and ``subscribe`` through it."""

    name = "local_bus"

    def __init__(self, settings: LocalBrokerSettings, node_id: str, *,
                 on_link: LinkListener | None = None, handlers: Handlers | None = None) -> None:
        self.settings = settings
        self._handlers = handlers if handlers is not None else Handlers()
        self.node_id = node_id
        self.client_id = settings.client_id or f"edge-agent-{node_id}"
        self._sensor_handler: MessageHandler | None = None
        self._dropped_filters: set[str] = set()  # removed from the config: unsubscribe on the next session
        self._routes: list[_Route] = []
        self._conn: MqttConnection | None = None
        self._route_cache: dict[str, _Route | None] = {}
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

    def subscribe(self, topic_filter: str, handler: MessageHandler, *, manual_ack: bool = False,
                  qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler`` (called on the loop, must not block).

        With ``manual_ack`` the handler must call ``msg.ack()`` once the message is safe; otherwise
        the bus acks right after the handler returns. Subscriptions are (re)made on every connect.
        A handler that raises loses that one message (acknowledged, counted: see ``agent.handlers``).
        """
        if qos not in (0, 1):
            raise ValueError(f"the local bus subscribes at QoS 0 or 1 (got {qos})")
        self._add_route(topic_filter, handler, manual_ack, qos)
        self._route_cache.clear()
        conn = self._conn
        if conn is not None and self._connected.is_set():
            task = asyncio.get_running_loop().create_task(
                conn.subscribe([(topic_filter, qos)], timeout_s=CONNECT_TIMEOUT_S))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _add_route(self, topic_filter: str, handler: MessageHandler, manual_ack: bool, qos: int) -> None:
        entry = self._handlers.add("local_bus", topic_filter, handler, (topic_filter,))
        self._routes.append(_Route(topic_filter, handler, manual_ack, qos, entry))

    def subscribe_sensors(self, handler: MessageHandler) -> None:
        """Route the configured ``subscriptions`` (sensor readings) to ``handler`` with manual ack;
        a SIGHUP that changes them (:meth:`reload`) re-routes and unsubscribes what was removed."""
        self._sensor_handler = handler
        for topic_filter in self.settings.subscriptions:
            self.subscribe(topic_filter, handler, manual_ack=True)

    async def reload(self, config: AgentConfig) -> None:
        """SIGHUP: a changed ``[local_broker]`` table takes effect by reconnecting. With the same client
        id the broker keeps the session, so nothing unacknowledged is lost on the way."""
        new = config.local_broker
        if new == self.settings:
            return
        old = self.settings
        self.settings = new
        client_id = new.client_id or f"edge-agent-{self.node_id}"
        if client_id != self.client_id:
            log.warning("local_bus_client_id_changed", old=self.client_id, new=client_id,
                        hint="readings queued for the old id stay on the broker under that session")
            self.client_id = client_id
        if self._sensor_handler is not None and list(new.subscriptions) != list(old.subscriptions):
            removed = set(old.subscriptions) - set(new.subscriptions)
            for route in self._routes:
                if route.topic_filter in removed and route.handler is self._sensor_handler:
                    self._handlers.remove(route.entry)
            self._routes = [r for r in self._routes
                            if r.topic_filter not in removed or r.handler is not self._sensor_handler]
            self._route_cache.clear()
            self._dropped_filters |= removed
            self._dropped_filters -= set(new.subscriptions)
            for topic_filter in new.subscriptions:
                if topic_filter not in {r.topic_filter for r in self._routes}:
                    self._add_route(topic_filter, self._sensor_handler, True, 1)
        log.info("local_bus_reconfigured", host=new.host, port=new.port, client_id=self.client_id,
                 subscriptions=list(new.subscriptions))
        self.request_reconnect("the [local_broker] configuration changed")

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
        conn = self._conn
        if conn is None or not self._connected.is_set():
            raise BusUnavailable(f"local broker {self.settings.host}:{self.settings.port} is not connected")
        data = payload.encode() if isinstance(payload, str) else payload
        try:
            await conn.publish(topic, data, qos=qos, retain=retain, timeout_s=puback_timeout_s)
        except ValueError as exc:  # a wildcard topic, QoS 2, an oversize topic: the caller's mistake
            raise PublishRefused(f"cannot publish to '{topic[:200]}' on the local broker: {exc}") from exc
        except MqttError as exc:
            raise BusUnavailable(f"publish to '{topic}' on the local broker failed: {exc}") from exc
        self.published += 1

    def request_reconnect(self, reason: str) -> None:
        """Drop the connection (e.g. storage failed): unacked messages come back after reconnect."""
        self._reconnect_reason = reason
        self._wake.set()

    # ---- service ------------------------------------------------------------------------------

    async def run(self) -> None:
        s = self.settings
        backoff = Backoff(s.reconnect_min_s, s.reconnect_max_s)
        while True:
            started = time.monotonic()
            try:
                await self._session()
                detail = self._reconnect_reason or "connection closed"
            except (MqttError, OSError) as exc:
                detail = str(exc) or type(exc).__name__
            finally:
                self._down()
            if time.monotonic() - started >= STABLE_SESSION_S:
                # only a session that held for a while resets the backoff: a store that keeps failing
                # (disk full) or a broker that drops us at once must not make us reconnect in a tight loop
                backoff.reset()
            self._reconnect_reason = None
            await self._link("down", detail)
            delay = backoff.next()
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
        self._generation += 1
        generation = self._generation
        conn, session_present = await open_connection(
            s.host, s.port, lambda p: self._deliver(p, generation), client_id=self.client_id,
            clean_session=False, keepalive_s=s.keepalive_s, username=s.username, password=s.password,
            timeout_s=CONNECT_TIMEOUT_S)
        self._conn = conn
        waker = asyncio.create_task(self._wake.wait())
        try:
            self.connects += 1
            await conn.subscribe(self._filters(), timeout_s=CONNECT_TIMEOUT_S)
            if self._dropped_filters:  # the persistent session still delivers what the config dropped
                await conn.unsubscribe(sorted(self._dropped_filters), timeout_s=CONNECT_TIMEOUT_S)
                self._dropped_filters.clear()
            self._connected.set()
            log.info("local_bus_connected", host=s.host, port=s.port, client_id=self.client_id,
                     session_present=session_present, subscriptions=[f for f, _ in self._filters()])
            if not session_present and self.connects > 1:
                # the broker forgot us between two connects: what it queued meanwhile is gone
                log.warning("local_bus_session_lost", host=s.host, port=s.port, client_id=self.client_id,
                            hint="enable persistence on the local broker (persistence true, a writable "
                                 "persistence_location) and keep the client id unique")
            await self._link("up", f"{s.host}:{s.port} as {self.client_id}")
            watched: set[asyncio.Future[Any]] = {conn.closed, waker}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if conn.closed.done():
                conn.closed.result()  # raises ConnectionLost with the reason
        finally:
            waker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waker
            self._wake.clear()
            self._connected.clear()
            conn.close()

    def _filters(self) -> list[tuple[str, int]]:
        seen: dict[str, int] = {}
        for r in self._routes:
            seen[r.topic_filter] = max(seen.get(r.topic_filter, 0), r.qos)
        return list(seen.items())

    def _route(self, topic: str) -> _Route | None:
        try:
            return self._route_cache[topic]
        except KeyError:
            pass
        route = next((r for r in self._routes if topics.matches(r.topic_filter, topic)), None)
        if len(self._route_cache) >= ROUTE_CACHE_MAX:
            self._route_cache.clear()  # many distinct topics: matching is cheap, memory stays bounded
        self._route_cache[topic] = route
        return route

    def _deliver(self, p: Publish, generation: int) -> None:
        """Called by the connection for each message, in order, on the loop."""
        self.received += 1
        msg = BusMessage(p.topic, p.payload, p.qos, p.retain, p.packet_id, time.monotonic(), self,
                         generation, size=p.size)
        route = self._route(p.topic)
        if route is None:
            msg.ack()
            return
        if self._handlers.call(route.entry, msg) is FAILED or not route.manual_ack:
            # a handler that raised (logged and counted by the guard) would raise again on every
            # redelivery: the message is acknowledged and lost, the session and every other message go on
            msg.ack()

    def _ack(self, msg: BusMessage) -> bool:
        conn = self._conn
        # the message's connection generation: a message is acked only on the connection it came on
        if msg._generation != self._generation or conn is None or not conn.is_open:  # noqa: SLF001 - same unit
            return False
        if msg.qos == 0:
            return True
        ok = conn.ack(msg.mid)
        if ok:
            self.acked += 1
        return ok

    def _down(self) -> None:
        self._connected.clear()
        self._conn = None

    async def _link(self, state: str, detail: str) -> None:
        if self._on_link is None:
            return
        try:
            await self._on_link(state, detail)
        except AgentError as exc:
            log.error("local_bus_link_state_failed", error=str(exc))
