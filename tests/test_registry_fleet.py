"""The gateway's registry path end to end: signed desired state, the MQTT doorbell, the pull, the swap.

Real parts only: Mosquitto with mutual TLS and the shipped ACL, Debian's docker-registry, releases
signed with agent.trust, OPA-ABI policies built with clang, the real FleetAgent (receiver, swap
orchestrator, SQLite). Releases fetched from the registry go through the same receiver as retained
MQTT releases, so what is asserted here is what a gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.fleet.publishing import PublishRefused, publish, ring
from agent.fleet.registry import desired_repository, doorbell_payload, parse_doorbell, scope_tag
from agent.fleet.topics import Scope, TopicError
from agent.oci.formats import desired_manifest
from agent.oci.publish import Publisher, RegistryTarget
from agent.trust.desired import (
    DesiredRelease,
    DesiredState,
    DesiredStateReplayed,
    DesiredStateWrongScope,
    sign_desired,
    verify_desired,
)
from agent.trust.errors import KeyOutOfScope, UnknownKey
from agent.trust.truststore import TrustSet
from agent_devkit.fleet import (
    FleetWorld,
    async_test,
    custom_section,
    fleet_world,
    manager,
    running,
    sandbox_wasm,
)
from agent_devkit.registry import Registry, running_registry
from agent_devkit.releases import Signer

SHA = "ab" * 32
DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def world(tmp_path: Path) -> Iterator[FleetWorld]:
    with fleet_world(tmp_path) as w:
        yield w


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


def _entry(version: int = 1, name: str = "gate") -> DesiredRelease:
    return DesiredRelease("policy", name, version, SHA, DIGEST, f"edge/policy/{name}")


def test_desired_state_signature_scope_and_sequence() -> None:
    signer, other = Signer.create(), Signer.create()
    trust = TrustSet((signer.trusted(kinds=("policy",), names="gate*"),))
    doc = DesiredState("site/plant-a", 3, "2026-12-02T00:00:00Z", (_entry(),))
    bundle = sign_desired(signer.key, doc)
    got = verify_desired(bundle, trust, scope="site/plant-a", min_sequence=3)
    assert got.sequence == 3 and got.releases == (_entry(),) and got.signer_key_id == signer.key_id
    with pytest.raises(DesiredStateReplayed):  # an older document replayed by a mirror or an attacker
        verify_desired(bundle, trust, scope="site/plant-a", min_sequence=4)
    with pytest.raises(DesiredStateWrongScope):  # copied to another scope's tag
        verify_desired(bundle, trust, scope="site/plant-b", min_sequence=None)
    with pytest.raises(UnknownKey):
        verify_desired(sign_desired(other.key, doc), trust, scope="site/plant-a", min_sequence=None)
    from agent.trust.desired import parse_desired
    from agent.trust.errors import MalformedPredicate
    bad = {**doc.to_predicate(), "releases": [{**_entry().to_json(), "bundle": "md5:1234"}]}
    with pytest.raises(MalformedPredicate, match="bundle"):
        parse_desired(bad)
    wide = DesiredState("all", 1, "", (_entry(), _entry(name="other")))
    with pytest.raises(KeyOutOfScope):  # the key may sign gate*, not "other"
        verify_desired(sign_desired(signer.key, wide), trust, scope="all", min_sequence=None)


def test_scope_tags_and_doorbells() -> None:
    assert [scope_tag(Scope.parse(s)) for s in ("all", "site/plant-a", "group/line.1", "gw/gw-7")] == \
        ["all", "site-plant-a", "group-line.1", "gw-gw-7"]
    with pytest.raises(TopicError, match="letters, digits"):
        scope_tag(Scope.parse("site/plant:a"))
    payload = doorbell_payload(Scope.parse("site/plant-a"), DIGEST, 4)
    assert len(payload) < 200
    bell = parse_doorbell("edge/v1", "edge/v1/desired/site/plant-a", payload)
    assert bell is not None and bell.digest == DIGEST and bell.sequence == 4
    # a doorbell is a hint: anything odd is ignored, never an error
    assert parse_doorbell("edge/v1", "edge/v1/desired/site/plant-b", payload) is None  # scope ≠ topic
    assert parse_doorbell("edge/v1", "edge/v1/desired/site/plant-a", b"x" * 2000) is None
    assert parse_doorbell("edge/v1", "edge/v1/desired/site/plant-a", b"\xff{") is None


def test_publish_refuses_what_gateways_would_refuse(registry: Registry, tmp_path: Path) -> None:
    signer, stranger = Signer.create(), Signer.create()
    trust = TrustSet((signer.trusted(),))
    pub = Publisher(RegistryTarget(registry.url))
    wasm = sandbox_wasm()
    good = signer.sign(wasm, "policy", "gate", 2)
    with pytest.raises(PublishRefused, match="--trust"):
        publish(pub, artifact=wasm, bundle=stranger.sign(wasm, "policy", "gate", 2), targets=[Scope("all")],
                repo_prefix="edge", trust=trust, signing_key=signer.key)
    with pytest.raises(PublishRefused, match="digest_mismatch"):
        publish(pub, artifact=custom_section(wasm, "x", b"1"), bundle=good, targets=[Scope("all")],
                repo_prefix="edge", trust=trust, signing_key=signer.key)
    with pytest.raises(PublishRefused, match="--signing-key"):
        publish(pub, artifact=wasm, bundle=good, targets=[Scope("all")], repo_prefix="edge", trust=trust,
                signing_key=stranger.key)
    report = publish(pub, artifact=wasm, bundle=good, targets=[Scope("all")], repo_prefix="edge", trust=trust,
                     signing_key=signer.key)
    assert [(s.scope, s.sequence, s.changed) for s in report.scopes] == [("all", 1, True)]
    again = publish(pub, artifact=wasm, bundle=good, targets=[Scope("all")], repo_prefix="edge", trust=trust,
                    signing_key=signer.key)
    assert [(s.sequence, s.changed) for s in again.scopes] == [(1, False)]  # idempotent
    older = signer.sign(custom_section(wasm, "x", b"old"), "policy", "gate", 1)
    with pytest.raises(PublishRefused, match="rollback is a new, higher version"):
        publish(pub, artifact=custom_section(wasm, "x", b"old"), bundle=older, targets=[Scope("all")],
                repo_prefix="edge", trust=trust, signing_key=signer.key)
    # a forged desired state in the registry is not signed over: refused, unless replaced on purpose
    forged = sign_desired(stranger.key, DesiredState("all", 9, "", (_entry(),)))
    manifest, _ = desired_manifest(forged, "all", 9)
    pub.push_desired(desired_repository("edge"), "all", manifest, forged)
    v3 = custom_section(wasm, "x", b"3")
    b3 = signer.sign(v3, "policy", "gate", 3)
    with pytest.raises(PublishRefused, match="--replace-desired"):
        publish(pub, artifact=v3, bundle=b3, targets=[Scope("all")], repo_prefix="edge", trust=trust,
                signing_key=signer.key)
    replaced = publish(pub, artifact=v3, bundle=b3, targets=[Scope("all")], repo_prefix="edge", trust=trust,
                       signing_key=signer.key, replace_desired=True)
    assert replaced.scopes[0].sequence == 10  # counts on from the forged one: gateways never go back


@async_test
async def test_doorbell_pull_swap_and_a_gateway_that_was_offline(world: FleetWorld, registry: Registry) -> None:
    """Publish to a site: the doorbell makes the online gateway pull, verify and activate; a gateway that
    was offline converges when it connects; retained release topics stay untouched (nothing on them)."""
    reg: dict[str, Any] = dict(registry=registry.url, registry_poll_s=120.0, registry_doorbell_jitter_s=0.2,
                               site="plant-a")
    gw1 = world.gateway("gw-1", **reg)
    gw2 = world.gateway("gw-2", **reg)
    trust = TrustSet((world.signer.trusted(),))
    pub = Publisher(RegistryTarget(registry.url))
    wasm = sandbox_wasm()
    async with running(gw1), manager(world) as mgr:
        assert gw1.agent.puller is not None
        await asyncio.wait_for(gw1.agent.puller.synced.wait(), 15)  # the first pull on start: nothing yet
        report = await asyncio.to_thread(publish, pub, artifact=wasm, bundle=world.sign(wasm, 1),
                                         targets=[Scope.parse("site/plant-a")], repo_prefix="edge", trust=trust,
                                         signing_key=world.signer.key)
        await ring(world.link_for("fleet-manager", client_id="bell", clean=True), "edge/v1", report.scopes)
        st = await mgr.wait_state("gw-1", 1, "active", limit_s=30)
        assert st["scope"] == "site/plant-a" and gw1.policies.get("gate") is not None
        counters = gw1.agent.puller.counters
        assert counters.desired_verified == 1 and counters.releases_fetched == 1 and counters.doorbells >= 1
        requests_v1 = gw1.agent.puller.client.stats.requests
        # v2: same doorbell path; the gateway fetches only what changed
        v2 = custom_section(wasm, "v", b"2")
        report2 = await asyncio.to_thread(publish, pub, artifact=v2, bundle=world.sign(v2, 2),
                                          targets=[Scope.parse("site/plant-a")], repo_prefix="edge", trust=trust,
                                          signing_key=world.signer.key)
        await ring(world.link_for("fleet-manager", client_id="bell", clean=True), "edge/v1", report2.scopes)
        await mgr.wait_state("gw-1", 2, "active", limit_s=30)
        assert gw1.agent.puller.client.stats.requests - requests_v1 <= 10
        # gw-2 was offline the whole time: it converges on v2 when it connects, with no doorbell of its own
        async with running(gw2):
            await mgr.wait_state("gw-2", 2, "active", limit_s=30)
            assert gw2.releases.active("policy", "gate").version == 2  # type: ignore[union-attr]
            assert gw2.agent.puller is not None and gw2.agent.puller.counters.releases_fetched == 1


@async_test
async def test_registry_down_changes_nothing_and_the_next_pull_catches_up(world: FleetWorld, tmp_path: Path) -> None:
    with running_registry(tmp_path / "reg") as registry:
        gw = world.gateway("gw-1", registry=registry.url, registry_poll_s=120.0, registry_doorbell_jitter_s=0.0)
        trust = TrustSet((world.signer.trusted(),))
        pub = Publisher(RegistryTarget(registry.url))
        wasm = sandbox_wasm()
        publish(pub, artifact=wasm, bundle=world.sign(wasm, 1), targets=[Scope("all")], repo_prefix="edge",
                trust=trust, signing_key=world.signer.key)
        async with running(gw), manager(world) as mgr:
            await mgr.wait_state("gw-1", 1, "active", limit_s=30)
            puller = gw.agent.puller
            assert puller is not None
            v2 = custom_section(wasm, "v", b"2")
            publish(pub, artifact=v2, bundle=world.sign(v2, 2), targets=[Scope("all")], repo_prefix="edge",
                    trust=trust, signing_key=world.signer.key)
            registry.stop()
            failures = puller.counters.failures
            puller.synced.clear()
            puller.kick()
            await asyncio.wait_for(puller.synced.wait(), 30)
            assert puller.counters.failures > failures
            assert gw.releases.active("policy", "gate").version == 1  # type: ignore[union-attr]
            assert gw.policies.get("gate") is not None  # still serving the last verified release
            registry.start()
            puller.kick()
            await mgr.wait_state("gw-1", 2, "active", limit_s=30)


@async_test
async def test_a_refused_release_is_not_downloaded_again_every_poll(world: FleetWorld, registry: Registry) -> None:
    """A release the gateway refuses (here: it needs a newer agent) is fetched once, reported rejected,
    and then waits out a backoff instead of being downloaded on every pull."""
    gw = world.gateway("gw-1", registry=registry.url, registry_poll_s=120.0)
    trust = TrustSet((world.signer.trusted(),))
    wasm = sandbox_wasm()
    publish(Publisher(RegistryTarget(registry.url)), artifact=wasm,
            bundle=world.signer.sign(wasm, "policy", "gate", 1, min_agent_version="99.0"), targets=[Scope("all")],
            repo_prefix="edge", trust=trust, signing_key=world.signer.key)
    async with running(gw), manager(world) as mgr:
        st = await mgr.wait_state("gw-1", 1, "rejected", limit_s=30)
        assert st["code"] == "agent_too_old"
        puller = gw.agent.puller
        assert puller is not None
        for _ in range(3):
            puller.synced.clear()
            puller.kick()
            await asyncio.wait_for(puller.synced.wait(), 15)
        assert puller.counters.releases_fetched == 1 and puller.counters.releases_skipped >= 3
        assert gw.releases.active("policy", "gate") is None


@async_test
async def test_no_broker_at_all_the_timer_is_enough(world: FleetWorld, registry: Registry) -> None:
    """With a registry and no fleet broker (url empty), the gateway still converges: by its timer."""
    gw = world.gateway("gw-1", url="", registry=registry.url, registry_poll_s=0.5)
    with pytest.raises(Exception, match="no fleet broker link"):
        _ = gw.agent.link
    trust = TrustSet((world.signer.trusted(),))
    task = asyncio.create_task(gw.agent.run())
    try:
        wasm = sandbox_wasm()
        await asyncio.to_thread(publish, Publisher(RegistryTarget(registry.url)), artifact=wasm,
                                bundle=world.sign(wasm, 1), targets=[Scope.parse("gw/gw-1")], repo_prefix="edge",
                                trust=trust, signing_key=world.signer.key)
        async with asyncio.timeout(30):
            while (rel := gw.releases.active("policy", "gate")) is None:
                await asyncio.sleep(0.1)
        assert rel.version == 1 and gw.policies.get("gate") is not None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        gw.store.close()
