"""The ``kubeedge`` service: the latest value of every property, mirrored into EdgeCore's device twins.

Never replays history (the cloud is last-arrival-wins): each device has at most one update in
flight, carrying the *latest* value of every property that differs from what EdgeCore last
confirmed. Confirmation is only the ``…/twin/update/result`` answer (a PUBACK proves nothing:
EdgeCore subscribes with clean sessions). After every (re)connect and every ``resync_interval_s``
the full state is published again, because EdgeCore re-sends nothing once its own cloud link returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

from agent.config.sync import KubeEdgeSettings
from agent.handlers import Handlers
from agent.jsonsafe import JsonRejected
from agent.logs import get_logger
from agent.messaging.backoff import Backoff
from agent.offload import run_blocking
from agent.storage import Store
from agent.storage.db import connect_reader
from agent.storage.store import kv_set_job
from agent.sync import twins
from agent.sync.drain import TokenBucket
from agent.sync.twins import DeviceRef, MembershipResult, TwinResult, TwinValueError

log = get_logger("kubeedge")

ERROR_TOPIC = "$hw/events/device//twin/update/result"
REJECT_SOURCE = "kubeedge"


@dataclass
class Pending:
    event_id: str
    twins: dict[str, tuple[str, str]]
    sent_at: float
    attempts: int


@dataclass
class DeviceSync:
    ref: DeviceRef
    desired: dict[str, tuple[str, str]] = field(default_factory=dict)  # twin -> (value, type)
    acked: dict[str, str] = field(default_factory=dict)  # twin -> value EdgeCore confirmed
    pending: Pending | None = None
    bound: bool | None = None
    state: str = "new"
    error: str = ""
    invalid: list[str] = field(default_factory=list)
    attempts: int = 0
    synced_at: float | None = None

    def diff(self) -> dict[str, tuple[str, str]]:
        return {k: v for k, v in self.desired.items() if self.acked.get(k) != v[0]}


class TwinSync:
    name = "kubeedge"

    def __init__(self, store: Store, settings: KubeEdgeSettings, node_id: str, host: str, port: int, *,
                 handlers: Handlers | None = None) -> None:
        self.store = store
        self.settings = settings
        self.node = settings.node_name or node_id
        self.host = settings.host or host
        self.port = settings.port or port
        self.client_id = settings.client_id or f"edge-agent-{node_id}-kubeedge"
        self.devices: dict[str, DeviceSync] = {}
        self.bad_devices: dict[str, str] = {}
        self.connected = False
        self.last_full_sync: float | None = None
        self.in_sync = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._backoff = Backoff(1.0, settings.reconnect_max_s)
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()
        self._bucket = TokenBucket(settings.max_messages_s)
        self._resync_due = True
        self._membership_due = True
        self._states_due = True
        self._last_snapshot = ""
        self.uncorrelated_errors: list[str] = []
        self.rejected = 0
        self._membership_answer = asyncio.Event()
        self._handlers = handlers if handlers is not None else Handlers(store.rejects)
        self._answers = self._handlers.add(REJECT_SOURCE, "edgecore_answers", self.handle_answer,
                                           tuple(self.subscriptions()))

    # ------------------------------------------------------------ local state

    def _read_properties(self) -> list[tuple[str, str, str, str]]:
        with self._conn_lock:  # runs on the offload pool; see _close_reader
            if self._conn is None:
                self._conn = connect_reader(self.store.path)
            rows = self._conn.execute(
                "SELECT device, name, value, type FROM properties ORDER BY device, name").fetchall()
        return [(str(d), str(n), str(v), str(t)) for d, n, v, t in rows]

    def _apply_properties(self, rows: list[tuple[str, str, str, str]]) -> None:
        desired: dict[str, dict[str, tuple[str, str]]] = {}
        invalid: dict[str, list[str]] = {}
        for device, prop, value, ptype in rows:
            if device in self.bad_devices:
                continue
            sync = self.devices.get(device)
            if sync is None:
                try:
                    ref = twins.resolve(self.settings, device)
                except TwinValueError as exc:
                    self.bad_devices[device] = str(exc)
                    log.error("twin_device_invalid", device=device, error=str(exc))
                    continue
                if ref is None:
                    continue
                sync = self.devices[device] = DeviceSync(ref)
                self._membership_due = True  # ask before publishing: an unbound device only earns 404s
            name = sync.ref.twin_name(prop)
            if name is None:
                continue
            ttype = twins.twin_type(ptype)
            try:
                twins.check_name(name)
                desired.setdefault(device, {})[name] = (twins.normalise(value, ttype), ttype)
            except TwinValueError as exc:
                invalid.setdefault(device, []).append(f"{prop}: {exc}")
        for device, sync in self.devices.items():
            sync.desired = desired.get(device, {})
            if invalid.get(device) != sync.invalid and invalid.get(device):
                log.warning("twin_value_invalid", device=device, problems=invalid[device][:5])
            sync.invalid = invalid.get(device, [])

    # ------------------------------------------------------------ the connection

    async def run(self) -> None:
        backoff = self._backoff
        try:
            while True:
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    log.warning("kubeedge_broker_down", host=self.host, port=self.port, error=str(exc))
                    await self.store.set_link("kubeedge", "down", f"{self.host}:{self.port}: {exc}")
                self.connected = False
                self._client = None
                self.in_sync.clear()
                await self._save_snapshot()
                await asyncio.sleep(backoff.next())
        finally:
            self.connected = False
            with contextlib.suppress(Exception):  # the last word for `status` (the daemon is stopping)
                await asyncio.wait_for(self._save_snapshot(), 2.0)
            self._close_reader()

    def _close_reader(self) -> None:
        """Close the reader only when no offloaded read still uses it (cancellation does not stop threads)."""
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def subscriptions(self) -> list[str]:
        """EdgeCore's answer topics this service listens to."""
        prefix = "$hw/events/device/+/+" if self.settings.topic_style == "v1.17" else "$hw/events/device/+"
        return [f"{prefix}/twin/update/result", f"{prefix}/state/update/result", ERROR_TOPIC,
                f"$hw/events/node/{self.node}/membership/get/result",
                f"$hw/events/node/{self.node}/membership/updated"]

    async def _session(self) -> None:
        async with aiomqtt.Client(self.host, self.port, identifier=self.client_id, clean_session=True,
                                  protocol=aiomqtt.ProtocolVersion.V311, timeout=self.settings.answer_timeout_s,
                                  keepalive=30) as client:
            await client.subscribe([(s, 1) for s in self.subscriptions()])
            self._client = client
            self.connected = True
            self._backoff.reset()  # connected: the next loss starts again from the first delay
            # a reconnect is a full resync: EdgeCore may have lost everything meanwhile
            for sync in self.devices.values():
                sync.acked.clear()
                sync.pending = None
                sync.attempts = 0
            self._resync_due = self._membership_due = self._states_due = True
            await self.store.set_link("kubeedge", "up", f"{self.host}:{self.port} node {self.node}")
            log.info("kubeedge_connected", host=self.host, port=self.port, node=self.node)
            receiver = asyncio.create_task(self._receive(client))
            try:
                await self._tick_loop(client, receiver)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await receiver

    async def _tick_loop(self, client: aiomqtt.Client, receiver: asyncio.Task[None]) -> None:
        last_resync = last_membership = time.monotonic()
        while True:
            if receiver.done():
                receiver.result()  # re-raises the MqttError that ended the session
                raise aiomqtt.MqttError("the message stream ended")
            now = time.monotonic()
            if now - last_resync >= self.settings.resync_interval_s:
                self._resync_due = self._states_due = True
            if now - last_membership >= self.settings.membership_interval_s:
                self._membership_due = True
            self._apply_properties(await run_blocking(self._read_properties))
            if self._membership_due:
                self._membership_due = False
                last_membership = now
                self._membership_answer.clear()
                await self._publish(client, f"$hw/events/node/{self.node}/membership/get", twins.plain()[1])
                with contextlib.suppress(TimeoutError):  # EdgeCore may be down: then publish and see
                    await asyncio.wait_for(self._membership_answer.wait(), self.settings.answer_timeout_s)
            if self._resync_due:
                self._resync_due = False
                last_resync = now
                self.last_full_sync = time.time()
                for sync in self.devices.values():
                    sync.acked.clear()
                    if sync.state == "failing":
                        sync.state, sync.attempts = "pending", 0
                log.info("twin_full_resync", devices=len(self.devices))
            if self._states_due:
                self._states_due = False
                for sync in self.devices.values():
                    if sync.bound is not False:
                        await self._publish(client, sync.ref.topic("state/update"),
                                            twins.state_update(self.settings.device_state)[1])
            await self._send_updates(client)
            self._update_in_sync()
            await self._save_snapshot()
            await asyncio.sleep(self.settings.poll_interval_s)

    async def _send_updates(self, client: aiomqtt.Client) -> None:
        now = time.monotonic()
        for sync in self.devices.values():
            if sync.bound is False or sync.state == "failing":
                continue
            if sync.pending is not None:
                if now - sync.pending.sent_at < self.settings.answer_timeout_s:
                    continue
                sync.attempts += 1
                log.warning("twin_update_unanswered", device=sync.ref.device_id, event_id=sync.pending.event_id,
                            attempts=sync.attempts)
                sync.pending = None
                if sync.attempts >= self.settings.max_attempts:
                    sync.state = "failing"
                    sync.error = sync.error or f"no answer from EdgeCore after {sync.attempts} attempts"
                    continue
            diff = sync.diff()
            if not diff:
                continue
            event_id, body = twins.twin_update(diff)  # a fresh event_id, also for a retry
            sync.pending = Pending(event_id, diff, time.monotonic(), sync.attempts)
            sync.state = "pending"
            await self._publish(client, sync.ref.topic("twin/update"), body)

    async def _publish(self, client: aiomqtt.Client, topic: str, body: dict[str, Any]) -> None:
        await self._bucket.take(1)
        await client.publish(topic, json.dumps(body, separators=(",", ":")), qos=1)

    def _update_in_sync(self) -> None:
        ok = self.connected and all(
            s.bound is False or (s.pending is None and not s.diff()) for s in self.devices.values())
        if ok:
            self.in_sync.set()
        else:
            self.in_sync.clear()

    # ------------------------------------------------------------ answers

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            self._handlers.call(self._answers, str(message.topic),
                                bytes(raw) if isinstance(raw, bytes | bytearray) else b"")

    def handle_answer(self, topic: str, payload: bytes) -> None:
        """One message from EdgeCore's side: what does not parse or fit is a counted reject. Called through
        the handler guard, so a bug here costs this message only: no message (a retained one comes back
        after every restart) can end the session, the service or the daemon."""
        try:
            if topic.endswith("/membership/updated"):
                twins.check_object(payload)
                self._membership_due = True
            elif topic.endswith("/membership/get/result"):
                self._on_membership(twins.parse_membership(payload))
            elif topic.endswith("/twin/update/result"):
                self._on_twin_result(topic, twins.parse_twin_result(payload))
            else:  # state/update/result: EdgeCore's acknowledgement carries nothing the agent uses
                return
            self._update_in_sync()
        except JsonRejected as exc:
            self.rejected += 1
            self.store.rejects.note(REJECT_SOURCE, exc.code, f"{topic[:200]}: {exc}")
            log.warning("kubeedge_message_rejected", topic=topic[:200], code=exc.code, error=str(exc)[:300],
                        payload_bytes=len(payload))

    def _on_membership(self, answer: MembershipResult) -> None:
        self._membership_answer.set()
        ids = answer.device_ids
        for sync in self.devices.values():
            bound = sync.ref.device_id in ids
            if sync.bound is not bound:
                log.info("twin_membership", device=sync.ref.device_id, bound=bound, node=self.node)
                if bound:
                    sync.acked.clear()
                    sync.attempts = 0
                    sync.state = "pending"
            sync.bound = bound
            if not bound:
                sync.state = "unbound"
                sync.pending = None

    def _on_twin_result(self, topic: str, answer: TwinResult) -> None:
        event_id = answer.event_id
        if topic == ERROR_TOPIC or not event_id:
            # EdgeCore could not parse/validate a message: no id to correlate with; it answers in
            # order, so it belongs to the oldest update still waiting
            reason = answer.reason
            self.uncorrelated_errors = [*self.uncorrelated_errors[-9:], reason]
            waiting = [s for s in self.devices.values() if s.pending is not None]
            log.error("twin_update_rejected_uncorrelated", reason=reason, waiting=len(waiting))
            if waiting:
                sync = min(waiting, key=lambda s: s.pending.sent_at if s.pending else 0.0)
                sync.pending = None
                sync.state, sync.error = "failing", f"EdgeCore rejected an update: {reason}"
            return
        for sync in self.devices.values():
            if sync.pending is None or sync.pending.event_id != event_id:
                continue
            code = answer.code
            sent = sync.pending.twins
            sync.pending = None
            if code is None:
                for name, (value, _) in sent.items():
                    sync.acked[name] = value
                sync.attempts = 0
                sync.error = ""
                sync.bound = True if sync.bound is None else sync.bound
                sync.synced_at = time.time()
                sync.state = "synced" if not sync.diff() else "pending"
            elif code == 404:
                sync.bound = False
                sync.state = "unbound"
                sync.error = answer.reason or "device not found"
                log.error("twin_device_not_bound", device=sync.ref.device_id, node=self.node, reason=sync.error)
            else:
                sync.state = "failing"
                sync.error = f"{code}: {answer.reason}"
                log.error("twin_update_rejected", device=sync.ref.device_id, code=code, reason=answer.reason)
            return

    # ------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        devices = []
        for agent_device, sync in sorted(self.devices.items()):
            devices.append({"device": agent_device, "device_id": sync.ref.device_id, "bound": sync.bound,
                            "state": sync.state, "twins": len(sync.desired), "unsynced": len(sync.diff()),
                            "error": sync.error or None, "invalid": sync.invalid,
                            "synced_at": sync.synced_at})
        for agent_device, problem in sorted(self.bad_devices.items()):
            devices.append({"device": agent_device, "device_id": agent_device, "bound": None, "state": "invalid",
                            "twins": 0, "unsynced": 0, "error": problem, "invalid": [problem]})
        return {"node": self.node, "connected": self.connected, "last_full_sync": self.last_full_sync,
                "uncorrelated_errors": self.uncorrelated_errors, "devices": devices}

    async def _save_snapshot(self) -> None:
        data = self.snapshot()
        text = json.dumps({**data, "devices": [{**d, "synced_at": None} for d in data["devices"]]}, sort_keys=True)
        if text == self._last_snapshot:
            return
        self._last_snapshot = text
        await self.store.writer.run(kv_set_job("kubeedge.twins", json.dumps(data, sort_keys=True)))
