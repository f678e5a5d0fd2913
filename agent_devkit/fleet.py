"""Shared set-up of the fleet tests: a mutual-TLS Mosquitto with the shipped ACL, gateways, a manager.

Everything is real: certificates generated here, Mosquitto with ``configs/mosquitto-fleet.acl``,
really-signed releases verified by ``agent.trust``, OPA-ABI policies compiled with clang.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt

from agent.config import PolicySettings
from agent.config.fleet import FleetSettings
from agent.config.modules import ModuleSettings
from agent.daemon.releases import runnable_checks
from agent.fleet.envelope import encode
from agent.fleet.link import LinkConfig, client_kwargs
from agent.fleet.reporter import parse_status
from agent.fleet.service import FleetAgent
from agent.fleet.topics import Scope, Topics
from agent.policy.registry import PolicyRegistry
from agent.policy.runtime import PolicyRuntime
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store
from agent.trust.releases import ReleaseStore
from agent_devkit.broker import Broker, free_port
from agent_devkit.opa.build import build, uleb
from agent_devkit.releases import Signer
from agent_devkit.tls import TestPKI, fleet_broker_conf

NAME = "gate"


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on a fresh event loop (no asyncio pytest plugin is installed)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))
    return wrapper
TOPICS = Topics()


def sandbox_wasm() -> bytes:
    """The ABI-conformant test policy with good (ok/*) and hostile (bad/*) entrypoints."""
    return build("sandbox")


def custom_section(wasm: bytes, name: str, data: bytes) -> bytes:
    """Append a custom section (ignored by compilers): pads a policy to any size, changes its sha."""
    body = uleb(len(name)) + name.encode() + data
    return wasm + b"\x00" + uleb(len(body)) + body


@dataclass
class Manager:
    """The fleet manager's side: publishes releases, watches every gateway's status."""

    link: LinkConfig
    client: aiomqtt.Client | None = None
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    presence: dict[str, str] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def publish(self, topic: str, payload: bytes) -> None:
        assert self.client is not None
        await self.client.publish(topic, payload, qos=1, retain=True)

    async def push(self, scope: str, artifact: bytes, bundle: bytes, kind: str, name: str, version: int) -> None:
        topic = TOPICS.release(Scope.parse(scope), kind, name)
        await self.publish(topic, encode(kind, name, version, artifact, bundle))

    async def listen(self) -> None:
        assert self.client is not None
        async for msg in self.client.messages:
            topic = str(msg.topic)
            payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
            node = TOPICS.node_of_status(topic)
            if node is None:
                continue
            if topic == TOPICS.presence(node):
                self.presence[node] = payload.decode()
            else:
                st = parse_status(payload)
                if st is not None:
                    self.statuses[topic] = st
                    self.history.append((topic, st))
            self.changed.set()

    async def wait_for(self, pred: Callable[[], bool], limit_s: float = 30.0) -> None:
        async with asyncio.timeout(limit_s):
            while not pred():
                self.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), 0.05)  # also re-checks non-MQTT conditions

    def status(self, node: str, kind: str = "policy", name: str = NAME) -> dict[str, Any] | None:
        return self.statuses.get(TOPICS.status(node, kind, name))

    async def wait_state(self, node: str, version: int | None, state: str, *, kind: str = "policy",
                         name: str = NAME, code: str | None = None, limit_s: float = 30.0) -> dict[str, Any]:
        topic = TOPICS.status(node, kind, name)

        def seen() -> bool:
            return any(t == topic and s.get("version") == version and s.get("state") == state
                       and (code is None or s.get("code") == code) for t, s in self.history)
        await self.wait_for(seen, limit_s)
        return next(s for t, s in reversed(self.history) if t == topic and s.get("version") == version
                    and s.get("state") == state)


@dataclass
class Gateway:
    node_id: str
    state_dir: Path
    store: Store
    releases: ReleaseStore
    policies: PolicyRegistry
    agent: FleetAgent
    modules: ModuleRuntime | None = None
    task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.agent.run())
        await asyncio.wait_for(self.agent.link.connected.wait(), 15)

    def renew(self) -> None:
        """A fresh FleetAgent on the same state (what a daemon restart gives): memory comes from SQLite.
        The policy runtime serves ``self.policies`` (replace it first for a fresh process's memory)."""
        a = self.agent
        self.agent = FleetAgent(node_id=self.node_id, settings=a.settings, releases=self.releases,
                                policies=PolicyRuntime(self.store, PolicySettings(), registry=self.policies),
                                modules=self.modules)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
            self.task = None


@dataclass
class FleetWorld:
    tmp: Path
    pki: TestPKI
    broker: Broker
    signer: Signer
    url: str

    def link_for(self, cn: str, client_id: str | None = None, clean: bool = False) -> LinkConfig:
        files = self.pki.client(cn)
        return LinkConfig(url=self.url, client_id=client_id or cn, tls_ca=str(self.pki.ca), tls_cert=str(files.cert),
                          tls_key=str(files.key), clean_session=clean, reconnect_min_s=0.05, reconnect_max_s=0.5)

    def settings_for(self, node_id: str, **kw: Any) -> FleetSettings:
        files = self.pki.client(node_id)
        base = FleetSettings(enabled=True, url=self.url, client_id=node_id, tls_ca=str(self.pki.ca),
                             tls_cert=str(files.cert), tls_key=str(files.key), reconnect_min_s=0.05,
                             reconnect_max_s=0.5, health_window_s=2.0, health_min_evals=5)
        return replace(base, **kw)

    def gateway(self, node_id: str, *, modules: bool = False, **kw: Any) -> Gateway:
        state_dir = self.tmp / f"state-{node_id}"
        self.signer.trust(state_dir, kinds=("policy", "module"))
        store = Store.open(state_dir)
        policies = PolicyRegistry()
        policy_runtime = PolicyRuntime(store, PolicySettings(), registry=policies)
        runtime = ModuleRuntime(store, ModuleSettings(run_deadline_ms=300, memory_limit_mb=16),
                                state_dir=state_dir) if modules else None
        # the store checks module releases either way (with default limits when this gateway runs none)
        checks = runnable_checks(policy_runtime, runtime or ModuleRuntime(store, ModuleSettings(), state_dir=state_dir))
        releases = ReleaseStore(store, checkers=checks)
        agent = FleetAgent(node_id=node_id, settings=self.settings_for(node_id, **kw), releases=releases,
                           policies=policy_runtime, modules=runtime)
        return Gateway(node_id, state_dir, store, releases, policies, agent, modules=runtime)

    def sign(self, artifact: bytes, version: int, *, name: str = NAME, **meta: Any) -> bytes:
        return self.signer.sign(artifact, "policy", name, version, **meta)


def gateway_config(world: FleetWorld, path: Path, *, node: str, local_port: int, tables: str = "",
                   fleet: dict[str, object] | None = None) -> Path:
    """An ``agent.toml`` for a daemon on ``world``'s fleet broker (mutual TLS as ``node``) and a local
    broker on ``local_port``; ``fleet`` adds ``[fleet]`` keys, ``tables`` more TOML (``[policy]`` …)."""
    files = world.pki.client(node)
    extra = "\n".join(f"{k} = {json.dumps(v)}" for k, v in (fleet or {}).items())
    path.write_text(f"""
[agent]
node_id = "{node}"
heartbeat_interval_s = 0.5
log_format = "json"

[local_broker]
host = "127.0.0.1"
port = {local_port}
reconnect_min_s = 0.1
{tables}
[fleet]
enabled = true
url = "{world.url}"
tls_ca = "{world.pki.ca}"
tls_cert = "{files.cert}"
tls_key = "{files.key}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
{extra}
""")
    return path


@contextlib.contextmanager
def fleet_world(tmp: Path) -> Any:
    pki = TestPKI(tmp / "pki")
    port = free_port()
    # its own directory: a test that also runs a local broker (tests' `broker` fixture: tmp/mosquitto)
    # must not have two Mosquittos replacing each other's persistence file (one of them then exits)
    broker = Broker(tmp / "fleet-mosquitto", port=port, extra_conf=fleet_broker_conf(port, pki))
    broker.start()
    try:
        yield FleetWorld(tmp, pki, broker, Signer.create(), f"mqtts://127.0.0.1:{port}")
    finally:
        broker.thaw()
        broker.kill()


@contextlib.asynccontextmanager
async def manager(world: FleetWorld) -> AsyncIterator[Manager]:
    mgr = Manager(world.link_for("fleet-manager", client_id="mgr", clean=True))
    async with aiomqtt.Client(**client_kwargs(mgr.link)) as client:
        mgr.client = client
        await client.subscribe(f"{TOPICS.prefix}/status/#", qos=1)
        task = asyncio.create_task(mgr.listen())
        try:
            yield mgr
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


@contextlib.asynccontextmanager
async def running(*gateways: Gateway) -> AsyncIterator[None]:
    try:
        for gw in gateways:
            await gw.start()
        yield
    finally:
        for gw in gateways:
            await gw.stop()
            gw.store.close()


def decisions_job(name: str, version: int, rows: list[tuple[Any, Any, str]]) -> Callable[[Any], None]:
    """Record decisions (input, result, entrypoint) as the pipeline does."""
    def job(db: Any) -> None:
        for inp, result, ep in rows:
            db.execute("INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, input,"
                       " result, outcome) VALUES (0, 'b', 0, ?, ?, ?, ?, ?, 'ok')",
                       (name, version, ep, json.dumps(inp), json.dumps(result)))
    return job
