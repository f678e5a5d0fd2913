"""Hostile releases: what is signed, verified, installed and pushed is strict, bounded and refused with a
specific code (issue 11, "smaller ones": a version >= 2^63, install /dev/zero, a duplicate digest key,
NaN in a predicate, two policy.wasm members), plus properties over generated bundles and envelopes."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import AgentError
from agent.fleet.envelope import EnvelopeError, decode, encode
from agent.fleet.topics import Scope
from agent.trust import errors as E
from agent.trust.keyset import parse_keyset
from agent.trust.truststore import TrustSet
from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES, verify_release
from agent.wasm.bundle import BundleError, read_bundle
from agent_devkit import dsse_independent as indep
from agent_devkit.fleet import NAME, TOPICS, FleetWorld, async_test, fleet_world, manager, running, sandbox_wasm
from agent_devkit.hostile import HOSTILE_TOKENS, json_values
from agent_devkit.procs import run_agent
from agent_devkit.releases import Signer, opa_bundle, policy_wasm, wasm_module

WASM = wasm_module()
BIG = 2**63


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.create()


def trust(signer: Signer) -> TrustSet:
    return TrustSet((signer.trusted(),))


def raw_statement(artifact: bytes, predicate_text: str, digest_text: str | None = None) -> bytes:
    """The statement as JSON text written by hand: it can say what json.dumps never writes."""
    import hashlib
    sha = hashlib.sha256(artifact).hexdigest()
    digest = digest_text if digest_text is not None else f'{{"sha256": "{sha}"}}'
    return (f'{{"_type": "https://in-toto.io/Statement/v1", "predicateType": "urn:edge-agent:release:v1", '
            f'"subject": [{{"name": "a", "digest": {digest}}}], "predicate": {predicate_text}}}').encode()


def signed(signer: Signer, payload: bytes) -> bytes:
    return json.dumps(indep.bundle(signer.key.key, payload)).encode()


def test_a_version_past_64_bits_is_refused_at_sign_and_at_verify_with_its_code(signer: Signer) -> None:
    with pytest.raises(E.VersionOutOfRange) as info:
        signer.sign(WASM, "module", "m", BIG)
    assert info.value.code == "version_out_of_range"
    assert signer.sign(WASM, "module", "m", BIG - 1)  # the largest storable version signs
    for version in (BIG, 10**30):
        bundle = signed(signer, raw_statement(WASM, f'{{"kind": "module", "name": "m", "version": {version}}}'))
        with pytest.raises(E.VersionOutOfRange):
            verify_release(WASM, bundle, trust(signer), None, time.time())


def test_the_largest_version_installs_and_becomes_the_floor(signer: Signer, tmp_path: Path) -> None:
    from agent_devkit.releases import install
    signer.trust(tmp_path / "state")
    rel = install(tmp_path / "state", WASM, signer.sign(WASM, "module", "m", BIG - 1))
    assert rel.version == BIG - 1


def test_install_refuses_a_version_past_64_bits_without_a_traceback(signer: Signer, tmp_path: Path) -> None:
    """It was signed fine, then install died with OverflowError (SQLite) and a traceback."""
    state = tmp_path / "state"
    signer.trust(state)
    (tmp_path / "m.wasm").write_bytes(WASM)
    (tmp_path / "m.json").write_bytes(signed(signer, raw_statement(WASM, f'{{"kind": "module", "name": "m", '
                                                                           f'"version": {BIG}}}')))
    proc = run_agent("install", str(tmp_path / "m.wasm"), "--bundle", str(tmp_path / "m.json"),
                     "--state-dir", str(state))
    assert proc.returncode == 1 and "REJECTED [version_out_of_range]" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_install_dev_zero_is_refused_after_reading_one_byte_past_the_cap(signer: Signer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    signer.trust(state)
    (tmp_path / "m.json").write_bytes(signer.sign(WASM, "module", "m", 1))
    proc = run_agent("install", "/dev/zero", "--bundle", str(tmp_path / "m.json"), "--state-dir", str(state),
                     timeout=120)
    assert proc.returncode == 1 and "REJECTED [oversize]" in proc.stderr, proc.stderr


def test_install_reads_at_most_the_cap_from_a_stream(signer: Signer, tmp_path: Path) -> None:
    """A FIFO that would deliver 80 MiB: the reader stops one byte past the 32 MiB cap (the writer is
    then cut off), instead of reading it all before the size check."""
    state = tmp_path / "state"
    signer.trust(state)
    (tmp_path / "m.json").write_bytes(signer.sign(WASM, "module", "m", 1))
    fifo = tmp_path / "artifact.fifo"
    os.mkfifo(fifo)
    written = [0]
    chunk = b"\0" * (1 << 20)

    def feed() -> None:
        try:
            with fifo.open("wb") as out:
                for _ in range(80):
                    out.write(chunk)
                    written[0] += len(chunk)
        except BrokenPipeError:
            pass
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    proc = run_agent("install", str(fifo), "--bundle", str(tmp_path / "m.json"), "--state-dir", str(state),
                     timeout=120)
    writer.join(30)
    assert proc.returncode == 1 and "REJECTED [oversize]" in proc.stderr, proc.stderr
    assert written[0] <= DEFAULT_MAX_ARTIFACT_BYTES + (2 << 20), written[0]


def test_a_duplicate_digest_key_and_nan_in_the_predicate_are_refused(signer: Signer) -> None:
    import hashlib
    sha = hashlib.sha256(WASM).hexdigest()
    other = hashlib.sha256(b"other").hexdigest()
    cases = [
        raw_statement(WASM, '{"kind": "module", "name": "m", "version": 1}',
                      digest_text=f'{{"sha256": "{other}", "sha256": "{sha}"}}'),
        raw_statement(WASM, '{"kind": "module", "name": "m", "version": 1, "limits": {"memory_mb": NaN}}'),
        raw_statement(WASM, '{"kind": "module", "name": "m", "version": 1, "limits": {"deadline_ms": 1e400}}'),
        raw_statement(WASM, '{"kind": "module", "name": "m", "version": 1, "version": 2}'),
    ]
    for payload in cases:
        with pytest.raises(E.MalformedStatement):
            verify_release(WASM, signed(signer, payload), trust(signer), None, time.time())


def test_nan_metadata_is_refused_when_signing(tmp_path: Path) -> None:
    from agent_devkit.procs import run_fleet
    key, _ = Signer.create().write(tmp_path / "keys")
    (tmp_path / "m.wasm").write_bytes(WASM)
    (tmp_path / "meta.json").write_text('{"limits": {"memory_mb": NaN}}')
    proc = run_fleet("sign", str(tmp_path / "m.wasm"), "--key", str(key), "--kind", "module", "--name", "m",
                     "--version", "1", "--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "b.json"))
    assert proc.returncode != 0 and "json_non_finite" in proc.stderr, proc.stderr
    assert not (tmp_path / "b.json").exists()


def test_a_bundle_with_two_policy_wasm_members_is_refused(signer: Signer) -> None:
    tarball = opa_bundle(extra=[("/sub/policy.wasm", policy_wasm("other"))])
    with pytest.raises(BundleError, match=r"2 members named policy\.wasm"):
        read_bundle(tarball)
    with pytest.raises(E.UnsafeArchive):
        verify_release(tarball, signer.sign(tarball, "policy", "p", 1), trust(signer), None, time.time())


def test_a_bundle_data_document_with_nan_is_refused() -> None:
    tarball = opa_bundle(extra=[("/x/data.json", b'{"limit": NaN}')])
    with pytest.raises(BundleError, match="json_non_finite"):
        read_bundle(tarball)


@pytest.mark.parametrize("doc", [
    {"sequence": 1, "keys": 5}, {"sequence": 1, "keys": [{"public_key": "x", "kinds": 5}]},
    {"sequence": 1, "keys": [{"public_key": "x", "names": ["a"]}]}, {"sequence": BIG},
])
def test_a_malformed_key_set_is_a_keyset_rejection_not_a_crash(doc: dict[str, Any]) -> None:
    with pytest.raises(E.KeysetRejected):
        parse_keyset(json.dumps(doc).encode())


# ---- the fleet link ----------------------------------------------------------------------------------

@pytest.fixture
def world(tmp_path: Path) -> Any:
    with fleet_world(tmp_path) as w:
        yield w


@pytest.mark.timeout(120)
@async_test
async def test_a_version_past_64_bits_gets_a_rejected_status_on_the_fleet_link(world: FleetWorld) -> None:
    """It got no status at all: the install died on the way."""
    gw = world.gateway("gw-v")
    wasm = sandbox_wasm()
    topic = TOPICS.release(Scope("all"), "policy", NAME)
    envelope = json.loads(encode("policy", NAME, 1, wasm, world.sign(wasm, 1, entrypoints=["ok/echo"])))
    statement = (f'{{"_type": "https://in-toto.io/Statement/v1", "predicateType": "urn:edge-agent:release:v1", '
                 f'"subject": [{{"name": "p", "digest": {{"sha256": "{envelope["sha256"]}"}}}}], "predicate": '
                 f'{{"kind": "policy", "name": "{NAME}", "version": {BIG}, "entrypoints": ["ok/echo"]}}}}').encode()
    forged_version = json.dumps(dict(envelope, version=5, bundle=indep.bundle(world.signer.key.key, statement)))
    async with manager(world) as mgr, running(gw):
        await mgr.publish(topic, json.dumps(dict(envelope, version="V")).replace('"V"', str(BIG)).encode())
        st = await mgr.wait_state("gw-v", None, "rejected", code="version_out_of_range")
        assert "largest version" in st["message"]
        await mgr.publish(topic, forged_version.encode())
        await mgr.wait_state("gw-v", 5, "rejected", code="version_out_of_range")
        await mgr.publish(topic, json.dumps(envelope).encode())
        await mgr.wait_state("gw-v", 1, "active")  # and the link still works


# ---- properties ----------------------------------------------------------------------------------------

@st.composite
def mutated_bundles(draw: st.DrawFn) -> bytes:
    """A really signed bundle, then one field of it (or of its signed statement) replaced."""
    signer = SIGNER
    statement = json.loads(base64.b64decode(json.loads(GOOD)["dsseEnvelope"]["payload"]))
    where = draw(st.sampled_from(["bundle", "statement", "predicate", "raw"]))
    if where == "raw":
        text = GOOD.decode()
        cut = draw(st.integers(0, len(text)))
        return (text[:cut] + draw(st.sampled_from([*HOSTILE_TOKENS, "{", "]", '"', ","])) + text[cut:]).encode()
    value = draw(json_values(6))
    if where == "bundle":
        obj = json.loads(GOOD)
        obj[draw(st.sampled_from(sorted(obj)))] = value
        return json.dumps(obj).encode()
    target = statement if where == "statement" else statement["predicate"]
    target[draw(st.sampled_from(sorted(target)))] = value
    return signed(signer, json.dumps(statement).encode())


SIGNER = Signer.create()
GOOD = SIGNER.sign(WASM, "module", "m", 1)


@given(mutated_bundles())
def test_any_bundle_verifies_or_is_refused_with_a_release_code(bundle: bytes) -> None:
    try:
        v = verify_release(WASM, bundle, trust(SIGNER), None, time.time())
    except E.ReleaseRejected as exc:
        assert exc.code in {*E.ALL_CODES, "keyset_rejected"}
        return
    assert 1 <= v.version < BIG


@given(st.one_of(
    st.binary(max_size=300),
    json_values(8).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"format": st.just("edge-agent.release/v1"), "kind": json_values(1),
                           "name": json_values(1), "version": st.one_of(st.integers(), json_values(1)),
                           "sha256": json_values(1), "artifact": json_values(1), "bundle": json_values(3)}).map(
        lambda v: json.dumps(v).encode()),
))
def test_any_fleet_message_decodes_or_is_an_envelope_error(payload: bytes) -> None:
    try:
        env = decode(payload, max_bytes=1 << 16)
    except EnvelopeError as exc:
        assert exc.code.startswith(("envelope_", "artifact_", "version_"))
        return
    except AgentError as exc:  # pragma: no cover - a failure of this test
        raise AssertionError(f"not an EnvelopeError: {exc!r}") from exc
    assert 1 <= env.version < BIG
