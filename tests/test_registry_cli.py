"""``edge-fleet publish`` / ``export`` and ``edge-agent install LAYOUT`` as a user runs them, with a real
registry, plus layouts and artifacts made by oras-py (the ORAS SDK) installed on a gateway."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fleet.registry import desired_repository, release_repository
from agent.fleet.topics import Scope
from agent.oci.formats import BUNDLE, LAYER_WASM, desired_manifest, parse_manifest
from agent.oci.publish import Publisher, RegistryTarget
from agent.trust.desired import DesiredRelease, DesiredState, sign_desired
from agent_devkit.fleet import FleetWorld, async_test, custom_section, fleet_world, manager, running, sandbox_wasm
from agent_devkit.procs import run_agent, run_fleet
from agent_devkit.registry import Registry, running_registry
from agent_devkit.releases import Signer


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as reg:
        yield reg


def _keys(tmp: Path, signer: Signer) -> tuple[Path, Path]:
    return signer.write(tmp / "keys")


def _release(tmp: Path, signer: Signer, version: int) -> tuple[Path, Path]:
    wasm = custom_section(sandbox_wasm(), "v", str(version).encode())
    art, bundle = tmp / f"gate-v{version}.wasm", tmp / f"gate-v{version}.sigstore.json"
    art.write_bytes(wasm)
    bundle.write_bytes(signer.sign(wasm, "policy", "gate", version))
    return art, bundle


def test_publish_export_install_as_a_user(registry: Registry, tmp_path: Path) -> None:
    signer = Signer.create()
    key, pub = _keys(tmp_path, signer)
    art, bundle = _release(tmp_path, signer, 1)
    common = ["--registry", registry.url, "--trust", str(pub)]
    # mistakes are named with the flag that fixes them; nothing is pushed
    bad = run_fleet("publish", str(art), "--bundle", str(bundle), "--target", "site/a:b", "--signing-key", str(key),
                    *common)
    assert bad.returncode == 1 and "--target" in bad.stderr
    no_trust = run_fleet("publish", str(art), "--bundle", str(bundle), "--target", "all", "--signing-key", str(key),
                         "--registry", registry.url)
    assert no_trust.returncode == 1 and "--trust" in no_trust.stderr
    unset = run_fleet("publish", str(art), "--bundle", str(bundle), "--target", "all", "--signing-key", str(key),
                      "--username", "u", "--password-env", "EDGE_TEST_UNSET_VAR", *common)
    assert unset.returncode == 1 and "EDGE_TEST_UNSET_VAR" in unset.stderr
    ok = run_fleet("publish", str(art), "--bundle", str(bundle), "--target", "all", "--target", "site/plant-a",
                   "--signing-key", str(key), "--json", *common)
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["version"] == 1 and report["release"]["referrers"] == "tag-schema"
    assert [(s["scope"], s["sequence"]) for s in report["scopes"]] == [("all", 1), ("site/plant-a", 1)]
    assert len(report["release"]["verified"]) == 3
    text = run_fleet("publish", str(art), "--bundle", str(bundle), "--target", "all", "--signing-key", str(key),
                     *common)
    assert text.returncode == 0 and "unchanged: already says this" in text.stdout
    # export from the registry into a layout, then install on a gateway that trusts the key
    layout = tmp_path / "usb" / "releases"
    exp = run_fleet("export", "--to", str(layout), "--release", "policy/gate@1", "--json", *common)
    assert exp.returncode == 0, exp.stderr
    assert json.loads(exp.stdout)["releases"][0]["ref_name"] == "policy-gate-v1"
    state = tmp_path / "gw"
    signer.trust(state)
    inst = run_agent("install", str(layout), "--state-dir", str(state))
    assert inst.returncode == 0, inst.stderr
    assert "installed policy gate v1" in inst.stdout and "state=active" in inst.stdout
    again = run_agent("install", str(layout), "--state-dir", str(state))
    assert again.returncode == 0 and "already active" in again.stdout
    # a second release exported from files into the same layout: the install takes the new one only
    art2, bundle2 = _release(tmp_path, signer, 2)
    assert run_fleet("export", str(art2), "--bundle", str(bundle2), "--to", str(layout), "--trust", str(pub)
                     ).returncode == 0
    both = run_agent("install", str(layout), "--state-dir", str(state), "--json")
    rows = json.loads(both.stdout)["releases"]
    assert [(r["version"], r["state"]) for r in rows] == [(1, "already active"), (2, "active")]


def test_install_trusts_nothing_in_a_layout(registry: Registry, tmp_path: Path) -> None:
    signer, stranger = Signer.create(), Signer.create()
    _key, pub = _keys(tmp_path, signer)
    art, bundle = _release(tmp_path, signer, 1)
    layout = tmp_path / "layout"
    assert run_fleet("export", str(art), "--bundle", str(bundle), "--to", str(layout), "--trust", str(pub)
                     ).returncode == 0
    state = tmp_path / "gw"
    stranger.trust(state)  # this gateway trusts another key
    r = run_agent("install", str(layout), "--state-dir", str(state))
    assert r.returncode == 1 and "REJECTED [unknown_key]" in r.stderr
    signer.trust(state)
    # a flipped byte in the artifact blob: caught by the digest, before any verification
    flipped = tmp_path / "flipped"
    shutil.copytree(layout, flipped)
    blob = max((flipped / "blobs" / "sha256").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    r = run_agent("install", str(flipped), "--state-dir", str(state))
    assert r.returncode == 1 and "does not match its digest" in r.stderr
    # the signature removed from the index: nothing unsigned is installed
    unsigned = tmp_path / "unsigned"
    shutil.copytree(layout, unsigned)
    index = json.loads((unsigned / "index.json").read_text())
    index["manifests"] = [m for m in index["manifests"] if m.get("artifactType") != BUNDLE]
    (unsigned / "index.json").write_text(json.dumps(index))
    r = run_agent("install", str(unsigned), "--state-dir", str(state))
    assert r.returncode == 1 and "REJECTED [unsigned]" in r.stderr
    assert run_agent("install", str(tmp_path / "nowhere"), "--state-dir", str(state)).returncode == 1
    ok = run_agent("install", str(layout), "--state-dir", str(state))
    assert ok.returncode == 0 and "installed policy gate v1" in ok.stdout


def _oras_push_bundled(registry: Registry, tmp: Path, art: Path, bundle: Path, target: str) -> str:
    """What a fleet using the ORAS SDK (no referrers support) pushes: the release and its bundle as two
    layers of one manifest. Returns the manifest digest."""
    import oras.provider

    work = tmp / "oras-push"
    work.mkdir(exist_ok=True)
    shutil.copy(art, work / "policy.wasm")
    shutil.copy(bundle, work / "release.sigstore.json")
    client = oras.provider.Registry(hostname=registry.address, insecure=True)
    resp = client.push(target=f"{registry.address}/{target}", disable_path_validation=True, quiet=True,
                       files=[f"{work / 'policy.wasm'}:{LAYER_WASM}", f"{work / 'release.sigstore.json'}:{BUNDLE}"])
    return str(resp.headers["Docker-Content-Digest"])


def test_a_layout_written_by_oras_py_installs(registry: Registry, tmp_path: Path) -> None:
    import oras.layout
    import oras.provider

    signer = Signer.create()
    art, bundle = _release(tmp_path, signer, 3)
    _oras_push_bundled(registry, tmp_path, art, bundle, "edge/policy/gate:v3")
    layout = tmp_path / "oras-layout"
    oras.layout.NewLayoutFromRegistry(str(layout), oras.provider.Registry(hostname=registry.address, insecure=True),
                                      f"{registry.address}/edge/policy/gate:v3", tag="v3")
    state = tmp_path / "gw"
    signer.trust(state)
    r = run_agent("install", str(layout), "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    assert "installed policy gate v3" in r.stdout


@async_test
async def test_a_gateway_pulls_an_artifact_pushed_by_oras_py(tmp_path: Path) -> None:
    with fleet_world(tmp_path) as world, running_registry(tmp_path / "registry") as registry:
        await _gateway_pulls_oras_artifact(world, registry, tmp_path)


async def _gateway_pulls_oras_artifact(world: FleetWorld, registry: Registry, tmp_path: Path) -> None:
    art, bundle = _release(tmp_path, world.signer, 4)
    repo = release_repository("edge", "policy", "gate")
    digest = await asyncio.to_thread(_oras_push_bundled, registry, tmp_path, art, bundle, f"{repo}:v4")
    import hashlib
    sha = hashlib.sha256(art.read_bytes()).hexdigest()
    doc = DesiredState("all", 1, "", (DesiredRelease("policy", "gate", 4, sha, digest, repo),))
    signed = sign_desired(world.signer.key, doc)
    manifest, _ = desired_manifest(signed, str(Scope("all")), 1)
    pub = Publisher(RegistryTarget(registry.url))
    await asyncio.to_thread(pub.push_desired, desired_repository("edge"), "all", manifest, signed)
    assert parse_manifest(manifest).layers[0].media_type == BUNDLE
    gw = world.gateway("gw-1", registry=registry.url, registry_poll_s=120.0)
    async with running(gw), manager(world) as mgr:
        await mgr.wait_state("gw-1", 4, "active", limit_s=30)
