"""The fleet link against a real mutual-TLS Mosquitto with the shipped ACL: who may write where,
the last will, statuses queued while the broker is away, and the ``edge-fleet`` push/rollout tools."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.cli import fleet_main
from agent.fleet.link import client_kwargs
from agent.fleet.reporter import ReleaseStatus
from agent.fleet.topics import Scope
from agent_devkit.fleet import NAME, TOPICS, FleetWorld, async_test, fleet_world, manager, running, sandbox_wasm
from agent_devkit.tls import TestPKI

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


@async_test
async def test_acl_a_gateway_writes_only_its_own_status_topics(world: FleetWorld) -> None:
    async with manager(world) as mgr:
        gw1 = world.link_for("gw-1", clean=True)
        async with aiomqtt.Client(**client_kwargs(gw1)) as client:
            forged = ReleaseStatus(node_id="gw-2", kind="policy", name=NAME, version=9, state="active",
                                   active_version=9).to_json()
            await client.publish(TOPICS.status("gw-2", "policy", NAME), forged, qos=1, retain=True)
            await client.publish(TOPICS.presence("gw-2"), b"offline", qos=1, retain=True)
            # nor may it publish a release
            await client.publish(TOPICS.release(Scope("all"), "policy", NAME), b"{}", qos=1, retain=True)
            mine = ReleaseStatus(node_id="gw-1", kind="policy", name=NAME, version=1, state="active",
                                 active_version=1).to_json()
            await client.publish(TOPICS.status("gw-1", "policy", NAME), mine, qos=1, retain=True)
            # same client, same session: once its own message arrived the forged ones were processed
            await mgr.wait_for(lambda: mgr.status("gw-1") is not None)
        assert mgr.status("gw-2") is None and "gw-2" not in mgr.presence
    # a fresh subscriber sees no retained forgery and no release
    async with manager(world) as mgr2:
        await mgr2.wait_for(lambda: mgr2.status("gw-1") is not None)
        assert mgr2.status("gw-2") is None and "gw-2" not in mgr2.presence
    reader = world.link_for("gw-3", clean=True)
    async with aiomqtt.Client(**client_kwargs(reader)) as client:
        await client.subscribe(f"{TOPICS.prefix}/releases/#", qos=1)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for msg in client.messages:
                    raise AssertionError(f"a gateway managed to publish a release: {msg.topic}")


@async_test
async def test_unknown_client_certificate_is_refused(world: FleetWorld, tmp_path: Path) -> None:
    rogue = TestPKI(tmp_path / "rogue").client("gw-1")
    link = world.link_for("gw-1")
    bad = type(link)(**{**link.__dict__, "tls_cert": str(rogue.cert), "tls_key": str(rogue.key)})
    with pytest.raises(aiomqtt.MqttError):
        async with aiomqtt.Client(**client_kwargs(bad)):
            pass


_KILLED_GATEWAY = textwrap.dedent("""
    import asyncio, sys
    from agent.fleet.link import FleetLink, LinkConfig
    async def main():
        cfg = LinkConfig(url=sys.argv[1], client_id="gw-dies", tls_ca=sys.argv[2], tls_cert=sys.argv[3],
                         tls_key=sys.argv[4])
        async def ignore(topic, payload, retained): pass
        link = FleetLink(cfg, subscriptions=[], presence_topic="edge/v1/status/gw-dies/presence", on_message=ignore)
        task = asyncio.create_task(link.run())
        await link.connected.wait()
        print("up", flush=True)
        await task
    asyncio.run(main())
""")


@async_test
async def test_last_will_marks_a_dead_gateway_offline(world: FleetWorld) -> None:
    files = world.pki.client("gw-dies")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_GATEWAY, world.url, str(world.pki.ca), str(files.cert),
                             str(files.key)], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    try:
        async with manager(world) as mgr:
            await mgr.wait_for(lambda: mgr.presence.get("gw-dies") == "online", 30)
            os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker publishes the will
            await mgr.wait_for(lambda: mgr.presence.get("gw-dies") == "offline", 30)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout:
            proc.stdout.close()


@async_test
async def test_statuses_wait_while_the_broker_is_away(world: FleetWorld) -> None:
    gw = world.gateway("gw-q")
    async with running(gw):
        world.broker.kill()
        await asyncio.sleep(0.2)
        assert not gw.agent.link.connected.is_set()
        await gw.agent.reporter.report(ReleaseStatus(node_id="gw-q", kind="policy", name=NAME, version=1,
                                                     state="rejected", code="unknown_key", message="x"))
        await gw.agent.reporter.report(ReleaseStatus(node_id="gw-q", kind="policy", name=NAME, version=2,
                                                     state="rejected", code="expired", message="y"))
        world.broker.start()
        async with manager(world) as mgr:
            await mgr.wait_for(lambda: (mgr.status("gw-q") or {}).get("code") == "expired", 30)
        assert gw.agent.link.connects >= 2


@async_test
async def test_edge_fleet_push_and_rollout(world: FleetWorld, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    gws = [world.gateway(f"gw-{i}") for i in range(3)]
    wasm = sandbox_wasm()
    art, bundle = tmp_path / "policy.wasm", tmp_path / "policy.sigstore.json"
    art.write_bytes(wasm)
    bundle.write_bytes(world.sign(wasm, 4, entrypoints=["ok/echo"]))
    mgr_files = world.pki.client("fleet-manager")
    tls = ["--broker", world.url, "--ca", str(world.pki.ca), "--cert", str(mgr_files.cert), "--key",
           str(mgr_files.key)]
    async with running(*gws):
        rc = await asyncio.to_thread(fleet_main.main, ["push", str(art), "--bundle", str(bundle), "--target", "all",
                                                       *tls])
        assert rc == 0
        rc = await asyncio.to_thread(fleet_main.main, ["rollout", "--kind", "policy", "--name", NAME, "--version",
                                                       "4", "--watch", "--expect", "3", "--timeout", "60", *tls])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "active: 3" in out and "pending: 0" in out
        for gw in gws:
            assert out.count(gw.node_id) >= 1
        # a 4th gateway that never reports stays pending: not converged → exit 1
        rc = await asyncio.to_thread(fleet_main.main, ["rollout", "--kind", "policy", "--name", NAME, "--version",
                                                       "4", "--expect", "4", "--json", *tls])
        out = capsys.readouterr().out
        assert rc == 1
        assert '"pending": 1' in out and '"active": 3' in out
