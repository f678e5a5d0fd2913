"""A handler that raises costs one message; a service that dies is restarted; the daemon stays up.

The daemon's services are built exactly as ``edge-agent run`` builds them (every subsystem enabled,
against a real Mosquitto), then EVERY handler in the daemon's registry (``ctx.handlers``) is made to
raise in turn and a message is sent that reaches it. The list comes from the registry, not from this
file: a handler added later is injected too, and one the test cannot reach fails it (add a trigger).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import wasmtime

from agent.config import load_config
from agent.daemon.context import Context
from agent.daemon.heartbeat import started_job
from agent.daemon.main import Daemon
from agent.daemon.notify import Notifier
from agent.daemon.status import collect
from agent.daemon.supervisor import SERVICES_KEY, ServiceHealth
from agent.daemon.wiring import Components, build
from agent.handlers import Handler
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store
from agent.storage.lock import StateLock
from agent.sync.kubeedge import TwinSync
from agent_devkit.broker import Broker


class Injected(RuntimeError):
    """The failure injected into a handler."""


def config(tmp: Path, broker: Broker) -> Path:
    path = tmp / "agent.toml"
    path.write_text(f"""
[agent]
node_id = "gw-guard"
state_dir = "{tmp / 'state'}"
heartbeat_interval_s = 0.5

[local_broker]
host = "{broker.host}"
port = {broker.port}
subscriptions = ["factory/#"]

[outbox]
uplink_url = "{broker.url}"
jitter_max_s = 0.1

[kubeedge]
enabled = true
node_name = "guard-node"
poll_interval_s = 0.2

[fleet]
enabled = true
url = "{broker.url}"
""")
    return path


def concrete(topic_filter: str) -> str:
    """A topic the filter matches ('#' as three levels: the shape of a sensor reading's topic)."""
    return "/".join({"+": "x", "#": "x/x/x"}.get(level, level) for level in topic_filter.split("/"))


@dataclass
class Running:
    ctx: Context
    components: Components
    tasks: dict[str, asyncio.Task[None]]
    broker: Broker

    def alive(self) -> None:
        dead = {n: t for n, t in self.tasks.items() if t.done()}
        assert not dead, f"services ended: {dead}"


@contextlib.asynccontextmanager
async def daemon(tmp: Path, broker: Broker) -> AsyncIterator[Running]:
    cfg = load_config(config(tmp, broker))
    cfg.state_dir.mkdir(parents=True)
    lock = StateLock(cfg.state_dir)  # what `status` takes for a running daemon: the lock and its row
    lock.acquire()
    store = Store.open(cfg.state_dir, owner=True)
    await store.writer.run(started_job(cfg.agent.heartbeat_interval_s))
    ctx = Context(config=cfg, config_path=None, store=store, notifier=Notifier(""))
    components = build(ctx)
    services = components.services
    health = ServiceHealth(ctx, [s.name for s in services])
    await health.started()
    tasks = {s.name: asyncio.create_task(Daemon._run_service(ctx, s, health), name=s.name) for s in services}
    try:
        assert await components.local_bus.wait_connected(10)
        yield Running(ctx, components, tasks, broker)
    finally:
        for t in tasks.values():
            t.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        await store.rejects.flush()
        store.close()
        lock.release()


async def publish(broker: Broker, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client(broker.host, broker.port, identifier=f"t-guard-{time.monotonic_ns()}") as c:
        await c.publish(topic, payload, qos=1)


async def until(cond: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def printer(out: bytes) -> bytes:
    data = "".join(f"\\{b:02x}" for b in out)
    return bytes(wasmtime.wat2wasm(f"""(module
      (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
      (memory (export "memory") 1) (data (i32.const 64) "{data}")
      (func (export "_start") (i32.store (i32.const 0) (i32.const 64)) (i32.store (i32.const 4) (i32.const {len(out)}))
        (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))"""))


async def reading(run: Running) -> None:
    await publish(run.broker, "factory/line1/guard/temp", b"21.5")


async def module_output(run: Running) -> None:
    runtime: ModuleRuntime = run.components.modules
    if runtime.registry.get("guard") is None:
        wasm = printer(b'{"events": [{"severity": "info", "type": "t", "message": "m"}]}')
        await runtime.load_release("guard", 1, hashlib.sha256(wasm).hexdigest(), wasm,
                                   {"kind": "module", "name": "guard", "version": 1})
    await runtime.run_triggered("guard", {"kind": "manual"}, [])


# how to reach a handler that receives no MQTT message of its own (in-process events)
IN_PROCESS: dict[str, Callable[[Running], Awaitable[None]]] = {
    "ingest": reading,     # readings_committed:* — a stored reading reaches every listener
    "modules": module_output,  # module_output — a triggered run's output reaches the sink
}


async def trigger(run: Running, entry: Handler) -> None:
    if entry.filters:
        await publish(run.broker, concrete(entry.filters[0]), b'{"event_id": "x"}')
        return
    reach = IN_PROCESS.get(entry.source)
    assert reach is not None, (f"handler {entry.source}/{entry.name} receives no MQTT message and this test "
                               "does not know how to reach it: add it to IN_PROCESS")
    await reach(run)


def test_every_handler_that_raises_is_logged_counted_and_survived(broker: Broker, tmp_path: Path) -> None:
    async def main() -> None:
        async with daemon(tmp_path, broker) as run:
            entries = list(run.ctx.handlers)
            sources = {e.source for e in entries}
            assert {"local_bus", "ingest", "modules", "kubeedge", "fleet"} <= sources, sources
            bus = run.components.local_bus
            connects = bus.connects
            assert run.components.fleet is not None
            await until(run.components.fleet.link.connected.is_set, "the fleet link")
            for entry in entries:
                real, failures = entry.fn, entry.failures
                entry.fn = _raiser(entry)
                try:
                    await trigger(run, entry)
                    await until(_grew(entry, "failures", failures), f"{entry.source}/{entry.name} to fail")
                finally:
                    entry.fn = real
                run.alive()
                assert run.ctx.store.rejects.count(entry.source, "handler_failed") >= 1
                # and the same path works again at once, with the real handler
                calls = entry.calls
                await trigger(run, entry)
                await until(_grew(entry, "calls", calls), f"{entry.source}/{entry.name} to work again")
                assert entry.failures == failures + 1
            assert bus.connects == connects, "a failing handler made the local bus reconnect"
            run.alive()
            # a reading whose listener failed was stored anyway, once (acked, never redelivered); the message
            # whose route handler failed was acknowledged and dropped, the next one handled (a reject here)
            conn = run.ctx.store.reader()
            try:
                n = conn.execute("SELECT count(*) FROM readings WHERE device = 'line1/guard'").fetchone()[0]
                dropped = conn.execute("SELECT count(*) FROM rejects WHERE topic = 'factory/x/x/x'").fetchone()[0]
            finally:
                conn.close()
            assert (n, dropped) == (2, 1)
            await run.ctx.store.rejects.flush()
            report = collect(run.ctx.config)
            failed = [p for p in report["problems"] if "message handler failed" in p]
            assert {p.split()[1] for p in failed} == sources, report["problems"]

    asyncio.run(main())


def _grew(entry: Handler, counter: str, before: int) -> Callable[[], bool]:
    return lambda: int(getattr(entry, counter)) > before


def _raiser(entry: Handler) -> Callable[..., Any]:
    def boom(*_a: Any, **_k: Any) -> Any:
        raise Injected(f"injected into {entry.source}/{entry.name}")
    return boom


def test_a_service_that_dies_is_restarted_and_reported(broker: Broker, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with daemon(tmp_path, broker) as run:
            sync = next(s for s in run.components.services if isinstance(s, TwinSync))
            original = sync._tick_loop
            died = asyncio.Event()

            async def dies_once(*args: Any) -> None:
                if not died.is_set():
                    died.set()
                    raise RuntimeError("a bug in the twin sync")
                await original(*args)
            monkeypatch.setattr(sync, "_tick_loop", dies_once)
            await until(died.is_set, "the twin sync to fail")
            await until(lambda: _services_kv(run).get("kubeedge", {}).get("state") == "running"
                        and _services_kv(run)["kubeedge"]["restarts"] == 1, "the restart to be recorded")
            run.alive()
            report = collect(run.ctx.config)
            assert any("service 'kubeedge' failed and was restarted 1 time(s)" in p and "a bug in the twin sync" in p
                       for p in report["problems"]), report["problems"]
            await until(lambda: sync.connected, "the restarted twin sync to connect again")

    asyncio.run(main())


def _services_kv(run: Running) -> dict[str, Any]:
    conn = run.ctx.store.reader()
    try:
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (SERVICES_KEY,)).fetchone()
    finally:
        conn.close()
    return dict(json.loads(row[0])) if row else {}
