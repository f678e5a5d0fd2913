"""A strict EdgeCore stand-in on a real Mosquitto: the device-twin side of EdgeCore's MQTT protocol.

It subscribes the way EdgeCore's eventbus does (QoS 1, clean session: what is published while it is
not connected is lost), validates every message by EdgeCore's rules for twin updates (written up in
``docs/design.md``, "KubeEdge device twins: the protocol") and answers on the same topics with the
same shapes:

- parse/validation failures → ``$hw/events/device//twin/update/result``, empty ``event_id``, code 400;
- device not bound to this node → 404 on the device's result topic (with the ``event_id``);
- bad ``metadata.type`` or a value that does not parse as the twin's type → 400 with the ``event_id``;
- an empty ``actual``/``expected`` object wedges the twin module: no answers for ``wedge_s``;
- a state update for an unknown device or state → no answer at all.

Every broken rule is also appended to ``violations`` so tests can assert the agent never breaks one.
``go_deaf()`` disconnects it (EdgeCore cut off), ``mute`` makes it receive but never answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

KEY_RE = re.compile(r"[a-zA-Z0-9\-_.,:/@#]{1,128}")
VALUE_RE = re.compile(r"[a-zA-Z0-9\-_.,:/@#]{1,512}")
TYPES = ("string", "int", "integer", "float", "boolean")
STATES = ("online", "offline", "ok", "unknown", "unhealthy")
ERROR_TOPIC = "$hw/events/device//twin/update/result"
PREFIX = "$hw/events/device/"


class Rejected(Exception):
    def __init__(self, code: int, reason: str, correlated: bool) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.correlated = correlated


@dataclass
class Twin:
    value: str | None
    type: str
    optional: bool = True


@dataclass
class EdgeCorePeer:
    host: str
    port: int
    node: str = "demo-node"
    topic_style: str = "v1.17"
    bound: set[str] = field(default_factory=set)  # device ids ("ns/name" or "name") bound to this node
    wedge_s: float = 2.0
    twins: dict[str, dict[str, Twin]] = field(default_factory=dict)
    states: dict[str, str] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    answers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    updates: int = 0
    mute: bool = False
    force_error: str | None = None  # answer every twin update on the empty-id topic with this reason
    _deaf: bool = False
    _task: asyncio.Task[None] | None = None
    _connected: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _wedged_until: float = 0.0

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> EdgeCorePeer:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def go_deaf(self) -> None:
        """Disconnect (EdgeCore cut off from the broker): messages meanwhile are lost (clean session)."""
        self._deaf = True
        self._wake.set()
        for _ in range(200):
            if not self._connected.is_set():
                return
            await asyncio.sleep(0.02)

    async def hear_again(self) -> None:
        self._deaf = False
        self._wake.set()
        await asyncio.wait_for(self._connected.wait(), 10)

    async def _run(self) -> None:
        while True:
            if self._deaf:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                async with aiomqtt.Client(self.host, self.port, identifier=f"edgecore-{self.node}",
                                          clean_session=True, protocol=aiomqtt.ProtocolVersion.V311) as client:
                    await client.subscribe([(f"{PREFIX}#", 1), (f"$hw/events/node/{self.node}/membership/get", 1)])
                    self._connected.set()
                    self._wake.clear()
                    reader = asyncio.create_task(self._consume(client))
                    waker = asyncio.create_task(self._wake.wait())
                    try:
                        await asyncio.wait({reader, waker}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        for t in (reader, waker):
                            t.cancel()
                            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                                await t
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)
            finally:
                self._connected.clear()

    async def _consume(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            data = raw if isinstance(raw, bytes | bytearray) else str(raw).encode()
            await self._handle(client, str(message.topic), bytes(data))

    # ------------------------------------------------------------ the protocol

    def device_id_of(self, topic: str, suffix: str) -> str:
        return topic[len(PREFIX):-len(suffix)]

    async def _answer(self, client: aiomqtt.Client, topic: str, body: dict[str, Any]) -> None:
        self.answers.append((topic, body))
        await client.publish(topic, json.dumps(body), qos=1)

    async def _handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        if self.mute or time.monotonic() < self._wedged_until:
            return
        if topic == f"$hw/events/node/{self.node}/membership/get":
            body = _loads(payload) or {}
            devices = [{"id": d, "name": d.split("/")[-1], "state": self.states.get(d, "unknown"),
                        "twin": self._twin_doc(d)} for d in sorted(self.bound)]
            await self._answer(client, f"$hw/events/node/{self.node}/membership/get/result",
                               {"event_id": str(body.get("event_id", "")), "timestamp": _ms(), "devices": devices})
            return
        if not topic.startswith(PREFIX) or topic.endswith("/result"):
            return
        if topic.endswith("/twin/update"):
            await self._twin_update(client, self.device_id_of(topic, "/twin/update"), payload)
        elif topic.endswith("/twin/get"):
            dev = self.device_id_of(topic, "/twin/get")
            body = _loads(payload) or {}
            if dev in self.bound:
                await self._answer(client, f"{PREFIX}{dev}/twin/get/result",
                                   {"event_id": str(body.get("event_id", "")), "timestamp": _ms(),
                                    "twin": self._twin_doc(dev)})
        elif topic.endswith("/state/update"):
            dev = self.device_id_of(topic, "/state/update")
            body = _loads(payload)
            if (not isinstance(body, dict) or dev not in self.bound or body.get("state") not in STATES
                    or not _is_int(body.get("timestamp", 0))):
                self.violations.append(f"state/update dropped silently for {dev}: {payload[:120]!r}")
                return  # EdgeCore answers nothing
            self.states[dev] = str(body["state"])
            await self._answer(client, f"{PREFIX}{dev}/state/update/result",
                               {"event_id": str(body.get("event_id", "")), "timestamp": _ms(),
                                "device": {"state": body["state"], "last_online": time.strftime("%Y-%m-%d %H:%M:%S")}})

    def _twin_doc(self, dev: str) -> dict[str, Any]:
        return {name: {"actual": {"value": t.value}, "metadata": {"type": t.type}}
                for name, t in self.twins.get(dev, {}).items() if t.value is not None}

    def _wrong_topic_shape(self, dev: str) -> bool:
        return ("/" not in dev) if self.topic_style == "v1.17" else ("/" in dev)

    async def _twin_update(self, client: aiomqtt.Client, dev: str, payload: bytes) -> None:
        self.updates += 1
        body = _loads(payload)
        event_id = body.get("event_id") if isinstance(body, dict) else None
        try:
            if self.force_error is not None:
                raise Rejected(400, self.force_error, False)
            changed = self._validate_and_apply(dev, body)
        except Rejected as rej:
            self.violations.append(f"{rej.code} {rej.reason} ({dev}: {payload[:160]!r})")
            if rej.code == 0:  # wedged: no answer at all
                self._wedged_until = time.monotonic() + self.wedge_s
                return
            answer = {"event_id": str(event_id) if rej.correlated else "", "timestamp": _ms(),
                      "code": rej.code, "reason": rej.reason}
            topic = f"{PREFIX}{dev}/twin/update/result" if rej.correlated else ERROR_TOPIC
            await self._answer(client, topic, answer)
            return
        self.event_ids.append(str(event_id))
        await self._answer(client, f"{PREFIX}{dev}/twin/update/result",
                           {"event_id": event_id, "timestamp": _ms(), "twin": changed})

    def _validate_and_apply(self, dev: str, body: Any) -> dict[str, Any]:
        unmarshal = Rejected(400, "Unmarshal update request body failed, Please check the request", False)
        if not isinstance(body, dict):
            raise unmarshal
        if not isinstance(body.get("event_id", ""), str) or not _is_int(body.get("timestamp", 0)):
            raise unmarshal
        twin = body.get("twin")
        if twin is not None and not isinstance(twin, dict):
            raise unmarshal
        twin = twin or {}
        for name, msg in twin.items():
            if msg is None:
                continue
            if not isinstance(msg, dict):
                raise unmarshal
            for part in ("actual", "expected"):
                tv = msg.get(part)
                if tv is None:
                    continue
                if not isinstance(tv, dict):
                    raise unmarshal
                if "value" not in tv or tv["value"] is None:
                    raise Rejected(0, f"empty {part} object for twin {name}: twin module wedged", False)
                if not isinstance(tv["value"], str):
                    raise unmarshal
            meta = msg.get("metadata")
            if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("type", ""), str)):
                raise unmarshal
        for name, msg in twin.items():
            if not KEY_RE.fullmatch(name):
                raise Rejected(400, "The key of twin must only include upper or lowercase letters, number, english, "
                                    "and special letter - _ . , : / @ # and the length of key should be less than "
                                    "128 bytes", False)
            if msg is None:
                continue
            for part in ("actual", "expected"):
                tv = msg.get(part)
                if tv is not None and tv["value"] and not VALUE_RE.fullmatch(tv["value"]):
                    raise Rejected(400, "The value of twin must only include upper or lowercase letters, number, "
                                        "english, and special letter - _ . , : / @ # and the length of value should "
                                        "be less than 512 bytes", False)
        if self._wrong_topic_shape(dev) or dev not in self.bound:
            raise Rejected(404, "Update rejected due to the device is not existed", True)
        existing = self.twins.setdefault(dev, {})
        staged: dict[str, Twin | None] = {}
        for name, msg in twin.items():
            if msg is None:
                if name not in existing:
                    raise Rejected(400, f"The update twin key:{name} does not exist", True)
                staged[name] = None
                continue
            meta = msg.get("metadata") or {}
            ttype = existing[name].type if name in existing else str(meta.get("type") or "string")
            if ttype not in TYPES:
                raise Rejected(400, "the value type is not allowed", True)
            value = (msg.get("actual") or msg.get("expected") or {}).get("value")
            if value is not None:
                _check_type(ttype, value)
            staged[name] = Twin(value, ttype)
        changed: dict[str, Any] = {}
        for name, new in staged.items():
            if new is None:
                existing.pop(name, None)
                changed[name] = None
                continue
            existing[name] = new
            changed[name] = {"actual": {"value": new.value}, "metadata": {"type": new.type}}
        return changed

    def values(self, dev: str) -> dict[str, str | None]:
        return {name: t.value for name, t in self.twins.get(dev, {}).items()}


def _check_type(ttype: str, value: str) -> None:
    if ttype in ("int", "integer"):
        if not re.fullmatch(r"[+-]?[0-9]+", value):
            raise Rejected(400, "the value is not int or integer", True)
    elif ttype == "float":
        try:
            float(value)
        except ValueError:
            raise Rejected(400, "the value is not float", True) from None
    elif ttype == "boolean" and value not in ("true", "false"):
        raise Rejected(400, "the bool value must be true or false", True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _ms() -> int:
    return int(time.time() * 1000)
