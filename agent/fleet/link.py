"""The fleet link: the agent's second MQTT connection, to the fleet manager's broker.

- TLS (``mqtts://``) with an optional client certificate (mutual TLS);
- a persistent session (``clean_session=False`` + a stable client id), MQTT 3.1.1 (v5 halved
  throughput in the platform measurements and buys nothing here);
- a retained presence message ``online`` published on every connect, and the same topic as the
  last will with ``offline`` (retained), so ``edge-fleet rollout`` tells offline gateways apart;
- reconnect forever with capped exponential backoff and *full jitter* (each wait uniform in
  ``[0, min(cap, base * 2**n)]``): thousands of gateways losing the same broker do not come back in
  lockstep;
- re-subscribe on every connect, which also makes the broker re-send the retained releases: that
  is what makes acknowledging on receipt safe here (a release lost between the PUBACK and its
  processing, e.g. by a crash, arrives again on the next connect);
- outgoing status messages are retained "latest per topic": while the link is down they wait in a
  dict (a newer status for the same topic replaces the older) and are flushed after connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from agent.errors import AgentError, ConfigError
from agent.handlers import Handlers
from agent.logs import get_logger
from agent.messaging.backoff import Backoff

log = get_logger("fleet")

MessageHandler = Callable[[str, bytes, bool], Awaitable[None]]
StateHandler = Callable[[str, str], Awaitable[None]]


class FleetLinkError(AgentError):
    """The fleet broker cannot be reached or refused us."""

    code = "fleet_link_error"


@dataclass(frozen=True)
class LinkConfig:
    url: str
    client_id: str
    username: str = ""
    password: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    clean_session: bool = False

    def endpoint(self) -> tuple[str, int, bool]:
        """(host, port, tls) from ``mqtt://host[:1883]`` / ``mqtts://host[:8883]``."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ConfigError(f"fleet broker URL {self.url!r} must look like mqtt://host:port or mqtts://host:port")
        tls = parts.scheme == "mqtts"
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise ConfigError(f"fleet broker URL {self.url!r} has an invalid port") from exc
        return parts.hostname, port, tls

    def __repr__(self) -> str:  # never show the password
        return f"LinkConfig(url={self.url!r}, client_id={self.client_id!r}, username={self.username!r})"


def tls_context(cfg: LinkConfig) -> ssl.SSLContext:
    """Server-authenticated TLS (CA file or the system store), plus our certificate when configured."""
    try:
        ctx = ssl.create_default_context(cafile=cfg.tls_ca or None)
        if cfg.tls_cert:
            ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"fleet TLS files cannot be loaded (tls_ca={cfg.tls_ca!r}, tls_cert={cfg.tls_cert!r}, "
                          f"tls_key={cfg.tls_key!r}): {exc}") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def client_kwargs(cfg: LinkConfig, *, will: aiomqtt.Will | None = None,
                  ssl_context: ssl.SSLContext | None = None) -> dict[str, Any]:
    host, port, tls = cfg.endpoint()
    kwargs: dict[str, Any] = {
        "hostname": host, "port": port, "identifier": cfg.client_id,
        "protocol": aiomqtt.ProtocolVersion.V311, "clean_session": cfg.clean_session,
        "keepalive": cfg.keepalive_s, "will": will, "timeout": 10.0,
        "username": cfg.username or None, "password": cfg.password or None,
    }
    if tls:
        kwargs["tls_context"] = ssl_context or tls_context(cfg)
    return kwargs


class FleetLink:
    """Keeps one fleet connection alive; hands every incoming message to ``on_message``."""

    def __init__(self, cfg: LinkConfig, *, subscriptions: list[str], presence_topic: str | None,
                 on_message: MessageHandler, on_state: StateHandler | None = None,
                 rng: random.Random | None = None, handlers: Handlers | None = None) -> None:
        self.cfg = cfg
        self.subscriptions = list(subscriptions)
        self.presence_topic = presence_topic
        self._handlers = handlers if handlers is not None else Handlers()
        # guarded: one bad message (or a bug handling it) costs that message, never the link
        self.on_message = self._handlers.add("fleet", "release_messages", on_message, tuple(subscriptions))
        self.on_state = on_state
        self._rng = rng or random.Random()
        self._ssl = tls_context(cfg) if cfg.endpoint()[2] else None
        self._client: aiomqtt.Client | None = None
        self._pending: dict[str, tuple[bytes, bool]] = {}
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.connects = 0
        self.published = 0

    async def publish(self, topic: str, payload: bytes, *, retain: bool = True) -> None:
        """Hand over a (retained) message; returns at once and never raises.

        The latest payload per topic waits in ``_pending`` and a background flush sends it (QoS 1); a
        broken or frozen broker delays only the message, never the caller (a hot swap must not wait
        for a PUBACK). Whatever is still pending is sent after the next connect."""
        self._pending[topic] = (payload, retain)
        if self._client is not None and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.create_task(self._flush_quietly(), name="fleet-flush")

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except aiomqtt.MqttError as exc:  # kept pending; the link loop reconnects and flushes
            log.warning("fleet_publish_deferred", pending=len(self._pending), error=str(exc))

    async def wait_flushed(self) -> None:
        """Until nothing is pending (tests, benchmarks, shutdown)."""
        while self._pending or (self._flusher is not None and not self._flusher.done()):
            if self._flusher is not None and not self._flusher.done():
                await asyncio.wait([self._flusher])
            else:
                await asyncio.sleep(0.01)

    async def _flush(self) -> None:
        async with self._flush_lock:
            client = self._client
            while self._pending and client is not None:
                topic, item = next(iter(self._pending.items()))
                await client.publish(topic, item[0], qos=1, retain=item[1])
                self.published += 1
                if self._pending.get(topic) is item:  # not replaced by a newer payload meanwhile
                    del self._pending[topic]

    async def _set_state(self, state: str, detail: str) -> None:
        if self.on_state is not None:
            try:
                await self.on_state(state, detail)
            except Exception as exc:  # a status write must never take the link down
                log.warning("fleet_state_record_failed", error=str(exc))

    async def run(self) -> None:
        """Connect, serve, reconnect — until cancelled."""
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, jitter="full", rng=self._rng)
        will = None
        if self.presence_topic:
            will = aiomqtt.Will(self.presence_topic, b"offline", qos=1, retain=True)
        while True:
            connected_at: float | None = None
            try:
                async with aiomqtt.Client(**client_kwargs(self.cfg, will=will, ssl_context=self._ssl)) as client:
                    connected_at = time.monotonic()
                    self.connects += 1
                    self._client = client
                    if self.presence_topic:
                        await client.publish(self.presence_topic, b"online", qos=1, retain=True)
                    for topic_filter in self.subscriptions:
                        await client.subscribe(topic_filter, qos=1)
                    self.connected.set()
                    log.info("fleet_link_up", client_id=self.cfg.client_id, connects=self.connects)
                    await self._set_state("up", self.cfg.url)
                    await self._flush()
                    try:
                        async for message in client.messages:
                            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                            await self._handlers.acall(self.on_message, str(message.topic), bytes(payload),
                                                       bool(message.retain))
                    except asyncio.CancelledError:
                        await self._goodbye(client)
                        raise
            except aiomqtt.MqttError as exc:
                self._client = None
                self.connected.clear()
                if connected_at is not None and time.monotonic() - connected_at > self.cfg.reconnect_max_s:
                    backoff.reset()  # a connection that lasted starts again from the first delay
                elif connected_at is not None:
                    backoff.reset(to=1)
                delay = backoff.next()
                log.warning("fleet_link_down", error=str(exc), retry_in_s=round(delay, 2), attempt=backoff.attempt)
                await self._set_state("down", str(exc)[:200])
                await asyncio.sleep(delay)
            finally:
                self._client = None
                self.connected.clear()
                if self._flusher is not None:
                    self._flusher.cancel()  # its message stays pending for the next connection

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On a clean stop say ``offline`` ourselves (the will only fires on an unexpected loss)."""
        if not self.presence_topic:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await client.publish(self.presence_topic, b"offline", qos=1, retain=True)
