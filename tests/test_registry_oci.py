"""Releases as OCI artifacts in a real registry (Debian's docker-registry, distribution 2.8).

Publishing (oras-py transport) and the gateway's pull client against the real registry: the
artifact and referrer shapes, the referrers tag schema (distribution 2.8 has no referrers API),
digest checks, resumable downloads, TLS with a private CA and basic auth, a pull-through cache as
mirror, and interoperability with oras-py in both directions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from agent.oci.client import (
    RegistryAuthError,
    RegistryClient,
    RegistryConfig,
    RegistryDigestMismatch,
    RegistryNotFound,
    RegistryUnavailable,
)
from agent.oci.formats import (
    ARTIFACT_MODULE,
    BUNDLE,
    EMPTY,
    LAYER_WASM,
    parse_index,
    parse_manifest,
    release_artifact,
    tag_schema,
)
from agent.oci.publish import Publisher, PublishError, RegistryTarget, choose_referrers_mode
from agent.trust.truststore import TrustSet
from agent.trust.verify import verify_release
from agent_devkit.registry import Registry, TokenServer, htpasswd_file, running_registry
from agent_devkit.releases import Signer, padded_wasm, wasm_module
from agent_devkit.tls import TestPKI

REPO = "edge/module/counter"
T = TypeVar("T")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.create()


def _release(signer: Signer, version: int, size: int = 0) -> tuple[bytes, bytes]:
    wasm = padded_wasm(size) if size else wasm_module(exports=("run", f"v{version}"))
    return wasm, signer.sign(wasm, "module", "counter", version)


def _pull(cfg: RegistryConfig, coro_fn: Callable[[RegistryClient], Awaitable[T]]) -> T:
    async def go() -> T:
        async with RegistryClient(cfg) as client:
            return await coro_fn(client)
    return asyncio.run(go())


def test_publish_writes_an_oci_11_artifact_and_a_tag_schema_referrer(registry: Registry, signer: Signer) -> None:
    wasm, bundle = _release(signer, 1)
    art = release_artifact("module", "counter", 1, wasm, bundle)
    report = Publisher(RegistryTarget(registry.url)).push_release(REPO, "v1", art)
    assert report.referrers_mode == "tag-schema"  # distribution 2.8: no OCI-Subject header
    assert report.digest == art.digest and len(report.verified) == 3

    async def read(client: RegistryClient) -> Any:
        manifest = await client.manifest(REPO, "v1")
        index, how = await client.referrers(REPO, manifest.digest)
        return manifest, index, how
    manifest, index, how = _pull(RegistryConfig(registry.url), read)
    assert manifest.artifact_type == ARTIFACT_MODULE and manifest.config.media_type == EMPTY
    assert [(d.media_type, d.size) for d in manifest.layers] == [(LAYER_WASM, len(wasm))]
    assert manifest.annotations["dev.edge-agent.release.version"] == "1"
    assert manifest.annotations["dev.edge-agent.release.sha256"] == hashlib.sha256(wasm).hexdigest()
    assert how == "tag-schema" and index is not None
    assert [d.artifact_type for d in index.manifests] == [BUNDLE]
    assert index.manifests[0].annotations["dev.sigstore.bundle.content"] == "dsse-envelope"
    # the referrer is cosign's bundle shape: subject = the release manifest, the bundle as the one layer
    referrer = parse_manifest(art.referrer)
    assert referrer.subject is not None and referrer.subject.digest == manifest.digest
    assert referrer.artifact_type == BUNDLE and referrer.layers[0].media_type == BUNDLE
    # publishing the same release again (a new referrer timestamp) adds nothing to the referrers index
    again_art = release_artifact("module", "counter", 1, wasm, bundle, existing=art.manifest,
                                 created="2030-01-01T00:00:00Z")
    assert again_art.referrer != art.referrer
    again_report = Publisher(RegistryTarget(registry.url)).push_release(REPO, "v1", again_art)
    assert again_report.referrer == report.referrer and again_report.digest == report.digest
    again = _pull(RegistryConfig(registry.url), lambda c: c.referrers(REPO, manifest.digest))
    assert again[0] is not None and len(again[0].manifests) == 1


def test_referrers_choice_follows_the_registry_answer() -> None:
    """The choice logic on recorded answers: distribution 2.8's PUT of a manifest with a subject (no
    OCI-Subject header) and a referrers-API registry's (OCI-Subject = the subject digest)."""
    subject = "sha256:" + "ab" * 32
    recorded_28 = {"Docker-Content-Digest": "sha256:" + "cd" * 32, "Docker-Distribution-Api-Version": "registry/2.0",
                   "Location": "http://127.0.0.1:5000/v2/x/manifests/sha256:" + "cd" * 32, "Content-Length": "0"}
    assert choose_referrers_mode(recorded_28, subject) == "tag-schema"
    assert choose_referrers_mode({**recorded_28, "OCI-Subject": subject}, subject) == "api"
    assert choose_referrers_mode({**recorded_28, "oci-subject": subject}, subject) == "api"
    assert choose_referrers_mode({**recorded_28, "OCI-Subject": "sha256:" + "00" * 32}, subject) == "tag-schema"
    assert tag_schema(subject) == "sha256-" + "ab" * 32


def test_pulled_bytes_verify_and_a_lying_registry_is_caught(registry: Registry, signer: Signer,
                                                           tmp_path: Path) -> None:
    wasm, bundle = _release(signer, 2, size=300_000)
    art = release_artifact("module", "counter", 2, wasm, bundle)
    Publisher(RegistryTarget(registry.url)).push_release(REPO, "v2", art)

    async def get(client: RegistryClient) -> bytes:
        return await client.download(REPO, art.layer.digest, art.layer.size, tmp_path, limit=1 << 24)
    got = _pull(RegistryConfig(registry.url), get)
    assert got == wasm
    v = verify_release(got, bundle, TrustSet((signer.trusted(),)), None, 2e9)
    assert v.version == 2
    # a blob that does not hash to the digest asked for is refused (the size is right, the bytes not)
    other, _ = _release(signer, 3, size=300_000)
    Publisher(RegistryTarget(registry.url)).push_blob(REPO, other, LAYER_WASM)
    wrong_digest = "sha256:" + hashlib.sha256(other).hexdigest()

    async def lie(client: RegistryClient) -> bytes:
        return await client.download(REPO, wrong_digest, len(other) - 1, tmp_path, limit=1 << 24)
    with pytest.raises(RegistryDigestMismatch):
        _pull(RegistryConfig(registry.url), lie)
    assert not list(tmp_path.glob("*.partial"))
    with pytest.raises(RegistryNotFound):
        _pull(RegistryConfig(registry.url), lambda c: c.manifest(REPO, "v99"))


def test_a_cut_download_resumes_with_a_range_request(registry: Registry, signer: Signer, tmp_path: Path) -> None:
    wasm, bundle = _release(signer, 4, size=2_000_000)
    art = release_artifact("module", "counter", 4, wasm, bundle)
    Publisher(RegistryTarget(registry.url)).push_release(REPO, "v4", art)
    hexd = art.layer.digest.split(":")[1]
    (tmp_path / f"{hexd}.partial").write_bytes(wasm[:1_200_000])  # what a cut left behind

    async def get(client: RegistryClient) -> tuple[bytes, int, int]:
        data = await client.download(REPO, art.layer.digest, art.layer.size, tmp_path, limit=1 << 24)
        return data, client.stats.bytes_in, client.stats.resumed
    data, fetched, resumed = _pull(RegistryConfig(registry.url), get)
    assert data == wasm and resumed == 1 and fetched == len(wasm) - 1_200_000
    assert not (tmp_path / f"{hexd}.partial").exists()
    # a corrupted partial file is found out by the digest and thrown away; the next attempt is whole
    (tmp_path / f"{hexd}.partial").write_bytes(b"\x00" * 1_000_000)
    with pytest.raises(RegistryDigestMismatch):
        _pull(RegistryConfig(registry.url), get)
    assert not (tmp_path / f"{hexd}.partial").exists()
    assert _pull(RegistryConfig(registry.url), get)[0] == wasm


def test_a_cut_during_transfer_keeps_the_bytes_that_arrived(registry: Registry, signer: Signer,
                                                            tmp_path: Path) -> None:
    """Cancel a real transfer in the middle (as a lost link or a stop would): the partial file holds
    what arrived, and the next download asks only for the rest."""
    wasm, bundle = _release(signer, 5, size=6_000_000)
    art = release_artifact("module", "counter", 5, wasm, bundle)
    Publisher(RegistryTarget(registry.url)).push_release(REPO, "v5", art)
    part = tmp_path / f"{art.layer.digest.split(':')[1]}.partial"

    async def cut() -> None:
        async with RegistryClient(RegistryConfig(registry.url)) as client:
            task = asyncio.create_task(client.download(REPO, art.layer.digest, art.layer.size, tmp_path,
                                                       limit=1 << 24))
            while client.stats.bytes_in < 2_500_000:
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    asyncio.run(cut())
    kept = part.stat().st_size
    assert 2_000_000 <= kept < len(wasm) and part.read_bytes() == wasm[:kept]

    async def resume(client: RegistryClient) -> tuple[bytes, int]:
        data = await client.download(REPO, art.layer.digest, art.layer.size, tmp_path, limit=1 << 24)
        return data, client.stats.bytes_in
    data, fetched = _pull(RegistryConfig(registry.url), resume)
    assert data == wasm and fetched == len(wasm) - kept


def test_offline_registry_is_unavailable_at_once(tmp_path: Path) -> None:
    from agent_devkit.broker import free_port
    cfg = RegistryConfig(f"http://127.0.0.1:{free_port()}", timeout_s=3)
    with pytest.raises(RegistryUnavailable):
        _pull(cfg, lambda c: c.manifest(REPO, "v1"))


def test_tls_private_ca_and_basic_auth(tmp_path: Path, signer: Signer) -> None:
    pki = TestPKI(tmp_path / "pki")
    server = pki.server()
    users = htpasswd_file(tmp_path / "htpasswd", {"fleet": "s3cret-push"})
    with running_registry(tmp_path / "reg", tls=(server.cert, server.key), htpasswd=users) as reg:
        wasm, bundle = _release(signer, 1)
        art = release_artifact("module", "counter", 1, wasm, bundle)
        # publishing: the CA and the credentials are checked before anything is pushed
        with pytest.raises(PublishError, match="--registry-ca"):
            Publisher(RegistryTarget(reg.url, "fleet", "s3cret-push"))
        with pytest.raises(PublishError, match="--username"):
            Publisher(RegistryTarget(reg.url, ca=str(pki.ca)))
        with pytest.raises(PublishError, match="refused user"):
            Publisher(RegistryTarget(reg.url, "fleet", "wrong", ca=str(pki.ca)))
        report = Publisher(RegistryTarget(reg.url, "fleet", "s3cret-push", ca=str(pki.ca))).push_release(
            REPO, "v1", art)
        assert report.referrers_mode == "tag-schema"
        good = RegistryConfig(reg.url, username="fleet", password="s3cret-push", ca=str(pki.ca))

        async def get(client: RegistryClient) -> bytes:
            m = await client.manifest(REPO, "v1")
            return await client.download(REPO, m.layers[0].digest, m.layers[0].size, tmp_path, limit=1 << 20)
        assert _pull(good, get) == wasm
        with pytest.raises(RegistryAuthError, match="registry_password"):
            _pull(RegistryConfig(reg.url, username="fleet", password="nope", ca=str(pki.ca)), get)
        with pytest.raises(RegistryAuthError):
            _pull(RegistryConfig(reg.url, ca=str(pki.ca)), get)
        with pytest.raises(RegistryUnavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            _pull(RegistryConfig(reg.url, username="fleet", password="s3cret-push"), get)


def test_bearer_token_flow_of_the_distribution_spec(tmp_path: Path, signer: Signer) -> None:
    """The registry answers 401 ``Bearer realm=…,service=…,scope=…``; the client gets a token from the
    realm with the configured user (basic) and retries; without credentials the token grants nothing."""
    issuer = TokenServer(tmp_path / "token", {"gateways": "pull-secret"})
    try:
        with running_registry(tmp_path / "reg", token=issuer) as reg:
            wasm, bundle = _release(signer, 1)
            art = release_artifact("module", "counter", 1, wasm, bundle)
            # oras-py's token backend does the same flow for the publisher
            Publisher(RegistryTarget(reg.url, "gateways", "pull-secret")).push_release(REPO, "v1", art)
            cfg = RegistryConfig(reg.url, username="gateways", password="pull-secret")

            async def get(client: RegistryClient) -> tuple[bytes, int]:
                m = await client.manifest(REPO, "v1")
                data = await client.download(REPO, m.layers[0].digest, m.layers[0].size, tmp_path, limit=1 << 20)
                return data, len(client._tokens)
            issued = issuer.issued
            data, tokens = _pull(cfg, get)
            assert data == wasm and tokens == 1 and issuer.issued == issued + 1  # one token, reused
            with pytest.raises(RegistryAuthError):
                _pull(RegistryConfig(reg.url), get)  # anonymous: a token without access
            with pytest.raises(RegistryAuthError, match="refused the credentials"):
                _pull(RegistryConfig(reg.url, username="gateways", password="wrong"), get)
    finally:
        issuer.close()


def test_pull_through_cache_mirror_serves_and_a_dead_mirror_falls_back(tmp_path: Path, signer: Signer) -> None:
    with running_registry(tmp_path / "origin") as origin, \
            running_registry(tmp_path / "cache", proxy_url=origin.url) as cache:
        wasm, bundle = _release(signer, 1, size=100_000)
        art = release_artifact("module", "counter", 1, wasm, bundle)
        Publisher(RegistryTarget(origin.url)).push_release(REPO, "v1", art)

        async def get(client: RegistryClient) -> tuple[bytes, dict[str, int]]:
            m = await client.manifest(REPO, art.digest)
            data = await client.download(REPO, m.layers[0].digest, m.layers[0].size, tmp_path, limit=1 << 20)
            return data, dict(client.stats.by_endpoint)
        data, used = _pull(RegistryConfig(origin.url, mirror=cache.url), get)
        assert data == wasm and set(used) == {cache.url}  # the site cache answered everything
        cache.stop()
        data, used = _pull(RegistryConfig(origin.url, mirror=cache.url, timeout_s=3), get)
        assert data == wasm and used.get(origin.url, 0) >= 2


def test_oras_py_pulls_what_publish_pushed(registry: Registry, signer: Signer, tmp_path: Path) -> None:
    """Interop: the ORAS SDK reads the artifact (by its title annotation) and the tag-schema index."""
    import oras.provider

    wasm, bundle = _release(signer, 7)
    art = release_artifact("module", "counter", 7, wasm, bundle, title="counter.wasm")
    Publisher(RegistryTarget(registry.url)).push_release(REPO, "v7", art)
    client = oras.provider.Registry(hostname=registry.address, insecure=True)
    files = client.pull(target=f"{registry.address}/{REPO}:v7", outdir=str(tmp_path))
    assert [Path(f).name for f in files] == ["counter.wasm"] and Path(files[0]).read_bytes() == wasm
    index = client.get_manifest(f"{registry.address}/{REPO}:{tag_schema(art.digest)}",
                                allowed_media_type=["application/vnd.oci.image.index.v1+json"])
    assert index["manifests"][0]["artifactType"] == BUNDLE
    ref = client.get_manifest(f"{registry.address}/{REPO}@{index['manifests'][0]['digest']}")
    assert ref["subject"]["digest"] == art.digest
    assert json.loads(client.get_blob(f"{registry.address}/{REPO}", ref["layers"][0]["digest"]).content) \
        == json.loads(bundle)
    assert parse_index(json.dumps(index).encode()).manifests[0].digest == index["manifests"][0]["digest"]
