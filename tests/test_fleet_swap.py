"""Fleet hot swap end to end: real Mosquitto (mutual TLS + the shipped ACL), really-signed releases,
OPA-ABI policies compiled from C, the real ReleaseStore and PolicyRegistry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent.fleet.envelope import encode
from agent.fleet.topics import Scope
from agent.policy.errors import PolicyEvalError
from agent.policy.registry import PolicyRegistry
from agent_devkit.fleet import (
    NAME,
    TOPICS,
    FleetWorld,
    async_test,
    custom_section,
    decisions_job,
    fleet_world,
    manager,
    running,
    sandbox_wasm,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


class Load:
    """Continuous evaluations of the active policy, the way the pipeline gate does them."""

    def __init__(self, policies: PolicyRegistry) -> None:
        self.policies = policies
        self.ok = 0
        self.failed: list[str] = []
        self.by_version: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        i = 0
        while True:
            policy = self.policies.get(NAME)
            if policy is not None:
                i += 1
                try:
                    policy.evaluate({"i": i})
                    self.ok += 1
                    self.by_version[policy.version] = self.by_version.get(policy.version, 0) + 1
                except PolicyEvalError as exc:
                    self.failed.append(f"v{policy.version}: {exc.code}")
            await asyncio.sleep(0.002)

    def __enter__(self) -> Load:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@async_test
async def test_push_becomes_active_and_presence_is_retained(world: FleetWorld) -> None:
    gw = world.gateway("gw-a")
    wasm = sandbox_wasm()
    async with manager(world) as mgr, running(gw):
        await mgr.wait_for(lambda: mgr.presence.get("gw-a") == "online")
        with Load(gw.policies) as load:
            await mgr.push("all", wasm, world.sign(wasm, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
            st = await mgr.wait_state("gw-a", 1, "active")
            assert st["active_version"] == 1 and st["shadow"] == {"evaluated": 0, "changed": 0, "errors": 0}
            assert [s["state"] for t, s in mgr.history if t.endswith(f"/{NAME}")][:3] == \
                ["received", "verified", "active"]
            await mgr.wait_for(lambda: load.ok > 20)
        policy = gw.policies.get(NAME)
        assert policy is not None and policy.version == 1 and policy.default_entrypoint == "ok/echo"
        active = gw.releases.active("policy", NAME)
        assert active is not None and active.version == 1 and active.source == "fleet:all"
        assert not load.failed
    # a clean stop says offline (retained): a later rollout query sees it
    async with manager(world) as mgr2:
        await mgr2.wait_for(lambda: mgr2.presence.get("gw-a") == "offline")
        await mgr2.wait_for(lambda: (mgr2.status("gw-a") or {}).get("state") == "active")


@async_test
async def test_shadow_diff_and_swap_without_a_failed_evaluation(world: FleetWorld) -> None:
    gw = world.gateway("gw-b")
    wasm = sandbox_wasm()
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", wasm, world.sign(wasm, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
        await mgr.wait_state("gw-b", 1, "active")
        # 30 recorded decisions of v1 on ok/echo; v2 answers ok/false on the same entrypoint name → all change
        rows: list[tuple[Any, Any, str]] = [({"i": i}, [{"result": {"i": i}}], "ok/echo") for i in range(20)]
        rows += [({"i": i}, {"i": i}, "ok/echo") for i in range(10)]  # value-only records count as equal
        rows += [({"i": 1}, [{"result": True}], "ok/false")]  # changed: the policy answers false
        await gw.store.writer.run(decisions_job(NAME, 1, rows))
        with Load(gw.policies) as load:
            await mgr.wait_for(lambda: load.ok > 50)
            await mgr.push("gw/gw-b", wasm, world.sign(wasm, 2, entrypoints=["ok/null"]), "policy", NAME, 2)
            st = await mgr.wait_state("gw-b", 2, "active")
            await mgr.wait_for(lambda: load.by_version.get(2, 0) > 50)
        assert st["shadow"] == {"evaluated": 31, "changed": 1, "errors": 0}
        assert not load.failed, load.failed
        assert load.by_version[1] > 0 and load.by_version[2] > 0


@async_test
async def test_bad_release_that_traps_rolls_back_by_itself(world: FleetWorld) -> None:
    gw = world.gateway("gw-c", health_window_s=5.0)
    wasm = sandbox_wasm()
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", wasm, world.sign(wasm, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
        await mgr.wait_state("gw-c", 1, "active")
        with Load(gw.policies) as load:
            await mgr.wait_for(lambda: load.ok > 20)
            await mgr.push("all", wasm, world.sign(wasm, 2, entrypoints=["bad/trap"]), "policy", NAME, 2)
            await mgr.wait_state("gw-c", 2, "active")
            st = await mgr.wait_state("gw-c", 2, "rolled_back")
            ok_after = load.ok
            await mgr.wait_for(lambda: load.ok > ok_after + 20)
        assert st["code"] == "health_traps" and st["active_version"] == 1 and "trap" in st["message"]
        policy = gw.policies.get(NAME)
        assert policy is not None and policy.version == 1
        active = gw.releases.active("policy", NAME)
        assert active is not None and active.version == 1
        assert gw.releases.floor("policy", NAME) == 2  # the floor is not lowered
        assert load.failed and all(f.startswith("v2") for f in load.failed)
        # reports name what runs (v1), not the floor (v2)
        await mgr.publish(TOPICS.release(Scope("gw", "gw-c"), "policy", NAME), b"garbage")
        bad = await mgr.wait_state("gw-c", None, "rejected", code="envelope_not_json")
        assert bad["active_version"] == 1
        # the retained bad release comes back on every reconnect: it must not be re-installed
        n = len(mgr.history)
        await gw.stop()
        gw.renew()
        await gw.start()
        await asyncio.sleep(0.5)
        assert all(s["state"] != "active" or s["version"] != 2 for _, s in mgr.history[n:])
        # a fix is a new, higher version
        fixed = custom_section(wasm, "fix", b"3")
        await mgr.push("all", fixed, world.sign(fixed, 3, entrypoints=["ok/echo"]), "policy", NAME, 3)
        await mgr.wait_state("gw-c", 3, "active")


@async_test
async def test_duplicates_and_out_of_order_deliveries_are_harmless(world: FleetWorld) -> None:
    gw = world.gateway("gw-d", health_window_s=0.5)
    w1, w2, w3 = (custom_section(sandbox_wasm(), "v", str(v).encode()) for v in (1, 2, 3))
    b1, b2, b3 = (world.sign(w, v, entrypoints=["ok/echo"]) for w, v in ((w1, 1), (w2, 2), (w3, 3)))
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", w1, b1, "policy", NAME, 1)
        await mgr.wait_state("gw-d", 1, "active")
        await mgr.push("gw/gw-d", w3, b3, "policy", NAME, 3)     # newest first ...
        await mgr.wait_state("gw-d", 3, "active")
        await mgr.push("site/nowhere", w2, b2, "policy", NAME, 2)  # (not for us)
        await mgr.push("all", w2, b2, "policy", NAME, 2)          # ... then an older one
        await mgr.push("all", w2, b2, "policy", NAME, 2)          # twice
        await mgr.push("gw/gw-d", w3, b3, "policy", NAME, 3)      # and the newest again
        # a sentinel on another release line proves the deliveries above were processed
        other = custom_section(sandbox_wasm(), "o", b"1")
        await mgr.push("all", other, world.sign(other, 1, name="other"), "policy", "other", 1)
        await mgr.wait_state("gw-d", 1, "active", name="other")
        await asyncio.sleep(0.3)
        # reconnect: the broker re-sends every retained release
        await gw.stop()
        await gw.start()
        await asyncio.sleep(0.5)
        await gw.agent.receiver.drain()
    counters = gw.agent.swap.counters
    assert counters.activated == 3  # v1, v3, other v1 — never v2, never twice
    assert counters.rejected == 0
    mine = [s for t, s in mgr.history if t == TOPICS.status("gw-d", "policy", NAME)]
    assert all(s["version"] != 2 for s in mine)
    assert mine[-1]["state"] == "active" and mine[-1]["version"] == 3
    reader = gw.store.reader()
    try:
        states = dict(reader.execute("SELECT version, state FROM fleet_releases WHERE name = ?", (NAME,)).fetchall())
    finally:
        reader.close()
    assert states == {1: "active", 2: "superseded", 3: "active"}
    policy = gw.policies.get(NAME)
    assert policy is not None and policy.version == 3


@async_test
async def test_release_for_another_target_is_ignored(world: FleetWorld) -> None:
    gw = world.gateway("gw-e", site="plant-1", groups=["presses"])
    wasm = sandbox_wasm()
    async with manager(world) as mgr, running(gw):
        for scope, v in (("gw/gw-other", 5), ("site/plant-2", 6), ("group/robots", 7)):
            await mgr.push(scope, wasm, world.sign(wasm, v), "policy", NAME, v)
        # signed for other nodes only (predicate targets), published to a scope that reaches us
        await mgr.push("site/plant-1", wasm, world.sign(wasm, 8, targets=["gw-x*"]), "policy", NAME, 8)
        await mgr.push("group/presses", wasm, world.sign(wasm, 2, entrypoints=["ok/echo"]), "policy", NAME, 2)
        await mgr.wait_state("gw-e", 2, "active")
        await gw.agent.receiver.drain()
    assert gw.agent.swap.counters.activated == 1
    assert gw.agent.receiver.counters.not_for_us == 1  # the targets=gw-x* one; other scopes never arrive
    assert gw.releases.floor("policy", NAME) == 2
    assert all(s["version"] == 2 for t, s in mgr.history if t == TOPICS.status("gw-e", "policy", NAME))


@async_test
async def test_malformed_payloads_are_rejected_with_a_specific_code(world: FleetWorld) -> None:
    gw = world.gateway("gw-f")
    wasm = sandbox_wasm()
    good = world.sign(wasm, 1, entrypoints=["ok/echo"])
    topic = TOPICS.release(Scope("all"), "policy", NAME)
    envelope = json.loads(encode("policy", NAME, 1, wasm, good))
    bad_b64 = dict(envelope, artifact="@@@not base64@@@")
    wrong_sha = dict(envelope, sha256="0" * 64)
    wrong_name = dict(envelope, name="someone-else")
    # a v2 whose signature was altered: passes the envelope checks, fails verification
    v2 = custom_section(wasm, "t", b"2")
    tampered_bundle = json.loads(world.sign(v2, 2, entrypoints=["ok/echo"]))
    sig = tampered_bundle["dsseEnvelope"]["signatures"][0]["sig"]
    tampered_bundle["dsseEnvelope"]["signatures"][0]["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    tampered = dict(json.loads(encode("policy", NAME, 2, v2, b"{}")), bundle=tampered_bundle)
    cases = [
        (b"{not json", "envelope_not_json"),
        (json.dumps({"format": "something/else"}).encode(), "envelope_format_unknown"),
        (json.dumps(dict(envelope, version="1")).encode(), "envelope_malformed"),
        (json.dumps(bad_b64).encode(), "artifact_not_base64"),
        (json.dumps(wrong_sha).encode(), "artifact_digest_mismatch"),
        (json.dumps(wrong_name).encode(), "envelope_topic_mismatch"),
        (json.dumps(tampered).encode(), "bad_signature"),
    ]
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", wasm, good, "policy", NAME, 1)
        await mgr.wait_state("gw-f", 1, "active")
        for payload, code in cases:
            await mgr.publish(topic, payload)
            st = await mgr.wait_state("gw-f", 2 if code == "bad_signature" else None, "rejected", code=code)
            assert st["active_version"] == 1 and st["message"]
        # an empty retained message clears the topic and uninstalls nothing
        await mgr.publish(topic, b"")
        sentinel = custom_section(wasm, "s", b"3")
        await mgr.push("gw/gw-f", sentinel, world.sign(sentinel, 2, entrypoints=["ok/echo"]), "policy", NAME, 2)
        await mgr.wait_state("gw-f", 2, "active")
    assert gw.agent.receiver.counters.cleared == 1
    assert gw.agent.receiver.counters.malformed == 6
    policy = gw.policies.get(NAME)
    assert policy is not None and policy.version == 2


@async_test
async def test_a_flood_of_releases_is_coalesced_to_the_newest(world: FleetWorld) -> None:
    gw = world.gateway("gw-g", health_window_s=0.3)
    base = sandbox_wasm()
    versions = list(range(1, 41))
    signed = []
    for v in versions:
        w = custom_section(base, "v", str(v).encode())
        signed.append((w, world.sign(w, v, entrypoints=["ok/echo"]), v))
    async with manager(world) as mgr, running(gw):
        for w, b, v in signed:
            await mgr.push("all", w, b, "policy", NAME, v)
        await mgr.wait_state("gw-g", versions[-1], "active", limit_s=60)
        await gw.agent.receiver.drain()
    c = gw.agent.receiver.counters
    assert c.handled + c.coalesced + c.duplicates + c.superseded == len(versions)
    assert c.handled < len(versions)  # bounded work: most were coalesced away
    policy = gw.policies.get(NAME)
    assert policy is not None and policy.version == versions[-1]


@async_test
async def test_5mb_release_and_broker_killed_mid_transfer(world: FleetWorld) -> None:
    gw = world.gateway("gw-h")
    big = custom_section(sandbox_wasm(), "pad", os.urandom(5 * 1024 * 1024))
    bundle = world.sign(big, 1, entrypoints=["ok/echo"])
    async with running(gw):
        with contextlib.suppress(aiomqtt.MqttError):
            async with manager(world) as mgr:
                await mgr.push("all", big, bundle, "policy", NAME, 1)
                # right after the PUBACK: the broker dies while it sends ~7 MB on to the gateway
                world.broker.kill()
        world.broker.start()  # same port; the gateway reconnects by itself (backoff with jitter)
        async with manager(world) as mgr:
            # the retained copy may or may not have been saved before the kill: the manager re-pushes
            # (at-least-once); the gateway ends with exactly one activation of v1, whole and verified
            await mgr.push("all", big, bundle, "policy", NAME, 1)
            await mgr.wait_for(lambda: (mgr.status("gw-h") or {}).get("state") == "active", 60)
            await gw.agent.receiver.drain()
        assert gw.agent.link.connects >= 2
    active = gw.releases.active("policy", NAME)
    assert active is not None and active.version == 1 and active.size == len(big)
    assert gw.agent.swap.counters.activated == 1
    assert gw.agent.swap.counters.rejected == 0


@async_test
async def test_modules_swap_between_runs_and_roll_back_when_runs_fail(world: FleetWorld) -> None:
    from agent.runtime.modules import ModuleRunFailed
    from agent_devkit.examples import example, test_module

    gw = world.gateway("gw-m", modules=True, health_window_s=5.0, health_min_evals=3)
    rt = gw.modules
    assert rt is not None
    good, bad = example("counter"), test_module("trap")
    sign = world.signer.sign
    async with manager(world) as mgr, running(gw):
        await mgr.push("all", good, sign(good, "module", "counter", 1), "module", "counter", 1)
        await mgr.wait_state("gw-m", 1, "active", kind="module", name="counter")
        assert (await rt.run("counter")).state == 1
        await mgr.push("all", bad, sign(bad, "module", "counter", 2), "module", "counter", 2)
        await mgr.wait_state("gw-m", 2, "active", kind="module", name="counter")
        failures = 0
        last_state = 1

        def rolled_back() -> bool:
            st = mgr.status("gw-m", "module", "counter") or {}
            return st.get("state") == "rolled_back"
        async with asyncio.timeout(30):
            while not rolled_back():
                try:
                    last_state = (await rt.run("counter")).state  # v1 again once the swap back happened
                except ModuleRunFailed as exc:
                    assert exc.outcome == "trap"
                    failures += 1
                await asyncio.sleep(0.05)
        st = mgr.status("gw-m", "module", "counter")
        assert st is not None and st["code"] == "health_traps" and st["active_version"] == 1
        loaded = rt.registry.get("counter")
        assert loaded is not None and loaded.version == 1
        assert failures >= 1
        assert (await rt.run("counter")).state == last_state + 1  # v1's saved state carried on
    active = gw.releases.active("module", "counter")
    assert active is not None and active.version == 1 and gw.releases.floor("module", "counter") == 2


@async_test
async def test_a_gateway_back_from_an_outage_goes_straight_to_the_newest(world: FleetWorld) -> None:
    gw = world.gateway("gw-o", health_window_s=0.3)
    w1, w2, w3 = (custom_section(sandbox_wasm(), "v", str(v).encode()) for v in (1, 2, 3))
    async with manager(world) as mgr:
        async with running(gw):
            await mgr.push("all", w1, world.sign(w1, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
            await mgr.wait_state("gw-o", 1, "active")
        # offline (its persistent session stays on the broker): two releases arrive meanwhile
        await mgr.push("all", w2, world.sign(w2, 2, entrypoints=["ok/echo"]), "policy", NAME, 2)
        await mgr.push("gw/gw-o", w3, world.sign(w3, 3, entrypoints=["ok/echo"]), "policy", NAME, 3)
        gw = world.gateway("gw-o", health_window_s=0.3)  # the daemon restarts on the same state
        async with running(gw):
            await mgr.wait_state("gw-o", 3, "active")
            await gw.agent.receiver.drain()
            assert gw.agent.swap.counters.activated == 1  # v3 only: v2 was never installed
            assert gw.agent.receiver.counters.coalesced + gw.agent.receiver.counters.superseded >= 1
    assert all(s.get("version") != 2 for t, s in mgr.history if t == TOPICS.status("gw-o", "policy", NAME))


@async_test
async def test_a_forged_newest_release_does_not_hide_the_good_one(world: FleetWorld) -> None:
    gw = world.gateway("gw-z", health_window_s=0.3)
    w1, w2, w9 = (custom_section(sandbox_wasm(), "v", str(v).encode()) for v in (1, 2, 9))
    forged = json.loads(world.sign(w9, 9, entrypoints=["ok/echo"]))
    sig = forged["dsseEnvelope"]["signatures"][0]["sig"]
    forged["dsseEnvelope"]["signatures"][0]["sig"] = ("B" if sig[0] == "A" else "A") + sig[1:]
    async with manager(world) as mgr:
        async with running(gw):
            await mgr.push("all", w1, world.sign(w1, 1, entrypoints=["ok/echo"]), "policy", NAME, 1)
            await mgr.wait_state("gw-z", 1, "active")
        await mgr.push("all", w2, world.sign(w2, 2, entrypoints=["ok/echo"]), "policy", NAME, 2)
        await mgr.publish(TOPICS.release(Scope("gw", "gw-z"), "policy", NAME),
                          encode("policy", NAME, 9, w9, forged))
        gw = world.gateway("gw-z", health_window_s=0.3)
        async with running(gw):
            await mgr.wait_state("gw-z", 9, "rejected", code="bad_signature")
            await mgr.wait_state("gw-z", 2, "active")
    policy = gw.policies.get(NAME)
    assert policy is not None and policy.version == 2
