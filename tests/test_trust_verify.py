"""The pure verifier: one test per rule, each asserting its specific error code; interop with an
independent signer; tampered variants refused."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from agent.trust import errors as E
from agent.trust.dsse import pae
from agent.trust.keys import KeyType
from agent.trust.truststore import TrustSet
from agent.trust.verify import VerifiedRelease, verify_release
from agent_devkit import dsse_independent as indep
from agent_devkit.releases import Signer, opa_bundle, wasm_module

NOW = time.time()
WASM = wasm_module()


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer.create()


def trust_of(*signers: Signer, kinds: tuple[str, ...] = (), names: str = "*") -> TrustSet:
    return TrustSet(tuple(s.trusted(kinds, names) for s in signers))


def verify(artifact: bytes, bundle: bytes, trust: TrustSet, floor: int | None = None,
           now: float = NOW, **kw: Any) -> VerifiedRelease:
    return verify_release(artifact, bundle, trust, floor, now, **kw)


def mutate_bundle(bundle: bytes, fn: Callable[[dict[str, Any]], None]) -> bytes:
    obj = json.loads(bundle)
    fn(obj)
    return json.dumps(obj).encode()


def resign(signer: Signer, statement: dict[str, Any]) -> bytes:
    """A correctly signed bundle around an arbitrary (possibly malformed) statement."""
    payload = json.dumps(statement).encode()
    return json.dumps(indep.bundle(signer.key.key, payload)).encode()


def statement_of(bundle: bytes) -> dict[str, Any]:
    obj = json.loads(bundle)
    return json.loads(base64.b64decode(obj["dsseEnvelope"]["payload"]))  # type: ignore[no-any-return]


def test_valid_release_both_key_types() -> None:
    key_types: tuple[KeyType, ...] = ("ecdsa-p256", "ed25519")
    for key_type in key_types:
        s = Signer.create(key_type)
        bundle = s.sign(WASM, "module", "counter", 3, entrypoints=["run"], limits={"memory_mb": 8},
                        trigger={"type": "interval", "every_s": 5}, targets=["gw-*"],
                        expires="2999-01-01T00:00:00Z", custom={"x": 1})
        v = verify(WASM, bundle, trust_of(s))
        assert (v.kind, v.name, v.version, v.signer_key_id) == ("module", "counter", 3, s.key_id)
        assert v.predicate.entrypoints == ("run",)
        assert v.predicate.limits == {"memory_mb": 8}
        assert v.predicate.trigger == {"type": "interval", "every_s": 5}
        assert v.predicate.targets_node("gw-7") and not v.predicate.targets_node("other")
        assert v.predicate.raw["custom"] == {"x": 1}
        assert v.artifact_format == "wasm"


def test_unsigned(signer: Signer) -> None:
    bundle = mutate_bundle(signer.sign(WASM, "module", "m", 1),
                           lambda o: o["dsseEnvelope"].__setitem__("signatures", []))
    with pytest.raises(E.Unsigned):
        verify(WASM, bundle, trust_of(signer))
    no_env = mutate_bundle(signer.sign(WASM, "module", "m", 1), lambda o: o.pop("dsseEnvelope"))
    with pytest.raises(E.Unsigned):
        verify(WASM, no_env, trust_of(signer))


def test_bad_signature_payload_altered(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 1)
    st = statement_of(bundle)
    st["predicate"]["version"] = 99  # the attacker bumps the version; the signature no longer matches

    def swap(o: dict[str, Any]) -> None:
        o["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    with pytest.raises(E.BadSignature) as info:
        verify(WASM, mutate_bundle(bundle, swap), trust_of(signer))
    assert info.value.code == "bad_signature"


def test_bad_signature_payload_type_swapped(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 1)
    with pytest.raises(E.MalformedBundle):
        verify(WASM, mutate_bundle(bundle, lambda o: o["dsseEnvelope"].__setitem__("payloadType", "text/plain")),
               trust_of(signer))


def test_unknown_key(signer: Signer) -> None:
    stranger = Signer.create()
    with pytest.raises(E.UnknownKey):
        verify(WASM, stranger.sign(WASM, "module", "m", 1), trust_of(signer))
    with pytest.raises(E.UnknownKey):
        verify(WASM, signer.sign(WASM, "module", "m", 1), TrustSet())


def test_key_out_of_scope(signer: Signer) -> None:
    with pytest.raises(E.KeyOutOfScope):
        verify(WASM, signer.sign(WASM, "module", "m", 1), trust_of(signer, kinds=("policy",)))
    with pytest.raises(E.KeyOutOfScope):
        verify(WASM, signer.sign(WASM, "module", "other", 1), trust_of(signer, names="line1-*"))
    assert verify(WASM, signer.sign(WASM, "module", "line1-x", 1), trust_of(signer, names="line1-*"))
    root = TrustSet((signer.trusted(role="root"),))
    with pytest.raises(E.KeyOutOfScope):  # root keys sign key sets, never releases
        verify(WASM, signer.sign(WASM, "module", "m", 1), root)


def test_digest_mismatch(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 1)
    with pytest.raises(E.DigestMismatch):
        verify(wasm_module(exports=("other",)), bundle, trust_of(signer))


@pytest.mark.parametrize("blob", [b"", b"not json", b"[]", json.dumps({"mediaType": "x"}).encode(),
                                  json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                                              "dsseEnvelope": {"payloadType": "a", "payload": "%%%",
                                                               "signatures": []}}).encode()])
def test_malformed_bundle(signer: Signer, blob: bytes) -> None:
    with pytest.raises(E.MalformedBundle):
        verify(WASM, blob, trust_of(signer))


def test_malformed_statement(signer: Signer) -> None:
    good = statement_of(signer.sign(WASM, "module", "m", 1))
    broken_statements = ({**good, "_type": "https://example.com/nope"}, {**good, "subject": []},
                         {**good, "subject": [{"digest": {"sha1": "ab"}}]},
                         {k: v for k, v in good.items() if k != "predicate"})
    for broken in broken_statements:
        with pytest.raises(E.MalformedStatement):
            verify(WASM, resign(signer, broken), trust_of(signer))
    not_json = json.dumps(indep.bundle(signer.key.key, b"{nope")).encode()
    with pytest.raises(E.MalformedStatement):
        verify(WASM, not_json, trust_of(signer))


@pytest.mark.parametrize("patch", [{"kind": "daemon"}, {"name": "../etc"}, {"version": 0}, {"version": "2"},
                                   {"version": True}, {"entrypoints": "run"}, {"trigger": "often"},
                                   {"limits": {"memory_mb": -1}}, {"expires": "tomorrow"},
                                   {"not_before": "2026-01-01T00:00:00"}, {"min_agent_version": "new"}])
def test_malformed_predicate(signer: Signer, patch: dict[str, Any]) -> None:
    st = statement_of(signer.sign(WASM, "module", "m", 1))
    st["predicate"].update(patch)
    with pytest.raises(E.MalformedPredicate):
        verify(WASM, resign(signer, st), trust_of(signer))


def test_wrong_predicate_type(signer: Signer) -> None:
    st = statement_of(signer.sign(WASM, "module", "m", 1))
    st["predicateType"] = "https://slsa.dev/provenance/v1"
    with pytest.raises(E.WrongPredicateType):
        verify(WASM, resign(signer, st), trust_of(signer))


def test_version_not_newer(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 5)
    for floor in (5, 6):
        with pytest.raises(E.VersionNotNewer):
            verify(WASM, bundle, trust_of(signer), floor=floor)
    assert verify(WASM, bundle, trust_of(signer), floor=4).version == 5
    with pytest.raises(E.VersionNotNewer):  # per kind+name mapping form
        verify_release(WASM, bundle, trust_of(signer), {("module", "m"): 7}, NOW)
    assert verify_release(WASM, bundle, trust_of(signer), {("module", "other"): 7}, NOW).version == 5


def test_expired_and_not_yet_valid(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 1, not_before="2026-01-01T00:00:00Z", expires="2026-06-01T00:00:00Z")
    with pytest.raises(E.Expired):
        verify(WASM, bundle, trust_of(signer), now=1_800_000_000.0)
    with pytest.raises(E.NotYetValid):
        verify(WASM, bundle, trust_of(signer), now=0.0)
    assert verify(WASM, bundle, trust_of(signer), now=1_770_000_000.0)


def test_invalid_wasm(signer: Signer) -> None:
    for blob in (b"\x00asm\x01\x00\x00\x00\xff\xff", b"MZ not wasm at all"):
        with pytest.raises(E.InvalidWasm):
            verify(blob, signer.sign(blob, "module", "m", 1), trust_of(signer))
        with pytest.raises(E.InvalidWasm):
            verify(blob, signer.sign(blob, "policy", "p", 1), trust_of(signer))


def test_opa_bundle_accepted_and_invalid(signer: Signer) -> None:
    good = opa_bundle()
    assert verify(good, signer.sign(good, "policy", "p", 1), trust_of(signer)).artifact_format == "opa_bundle"
    for bad in (b"\x1f\x8b" + b"garbage" * 10, opa_bundle(wasm=b"\x00asm\x01\x00\x00\x00\xff")):
        with pytest.raises((E.InvalidOpaBundle, E.InvalidWasm)):
            verify(bad, signer.sign(bad, "policy", "p", 1), trust_of(signer))
    with pytest.raises(E.InvalidOpaBundle):
        bad = b"\x1f\x8b" + b"garbage" * 10
        verify(bad, signer.sign(bad, "policy", "p", 1), trust_of(signer))


def test_unsafe_archive(signer: Signer) -> None:
    for bad in (opa_bundle(extra=[("../../evil.rego", b"x")]), opa_bundle(symlink="link.json")):
        with pytest.raises(E.UnsafeArchive):
            verify(bad, signer.sign(bad, "policy", "p", 1), trust_of(signer))


def test_oversize(signer: Signer) -> None:
    with pytest.raises(E.Oversize):
        verify(WASM, signer.sign(WASM, "module", "m", 1), trust_of(signer), max_artifact_bytes=len(WASM) - 1)


def test_agent_too_old(signer: Signer) -> None:
    bundle = signer.sign(WASM, "module", "m", 1, min_agent_version="99.0")
    with pytest.raises(E.AgentTooOld):
        verify(WASM, bundle, trust_of(signer))
    assert verify(WASM, bundle, trust_of(signer), agent_version="99.0.1")


def test_every_code_is_distinct() -> None:
    assert len(set(E.ALL_CODES)) == len(E.ALL_CODES) == 20


# ------------------------------------------------------------------------------------ interop

@pytest.mark.parametrize("kind", ["ecdsa", "ed25519"])
@pytest.mark.parametrize("urlsafe", [False, True])
def test_independent_signer_bundles_verify(kind: str, urlsafe: bool) -> None:
    from agent.trust.keys import load_public_pem
    from agent.trust.truststore import TrustedKey
    key = indep.new_key(kind)
    trust = TrustSet((TrustedKey(public=load_public_pem(indep.public_pem(key))),))
    payload = indep.statement(WASM, {"kind": "module", "name": "interop", "version": 4, "entrypoints": ["run"]})
    bundle = json.dumps(indep.bundle(key, payload, urlsafe=urlsafe)).encode()
    v = verify(WASM, bundle, trust)
    assert (v.name, v.version) == ("interop", 4)
    # v0.1 statements are accepted too
    old = indep.statement(WASM, {"kind": "module", "name": "interop", "version": 4},
                          statement_type="https://in-toto.io/Statement/v0.1")
    assert verify(WASM, json.dumps(indep.bundle(key, old)).encode(), trust).version == 4
    # without the key hint it still verifies (the signature decides, not the hint)
    assert verify(WASM, json.dumps(indep.bundle(key, payload, with_hint=False)).encode(), trust)

    # tampered variants: each must fail, with the right code
    tampered_sig = indep.bundle(key, payload)
    sig = bytearray(base64.b64decode(tampered_sig["dsseEnvelope"]["signatures"][0]["sig"]))
    sig[-1] ^= 0x01
    tampered_sig["dsseEnvelope"]["signatures"][0]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(E.BadSignature):
        verify(WASM, json.dumps(tampered_sig).encode(), trust)
    tampered_payload = indep.bundle(key, payload)
    tampered_payload["dsseEnvelope"]["payload"] = base64.b64encode(payload.replace(b'"version": 4',
                                                                                   b'"version": 40')).decode()
    with pytest.raises(E.BadSignature):
        verify(WASM, json.dumps(tampered_payload).encode(), trust)
    with pytest.raises(E.DigestMismatch):
        verify(WASM + b"\x00", json.dumps(indep.bundle(key, payload)).encode(), trust)
    other = indep.new_key(kind)
    with pytest.raises(E.UnknownKey):
        verify(WASM, json.dumps(indep.bundle(other, payload)).encode(), trust)


def test_agent_signer_matches_independent_pae() -> None:
    for pt, body in (("application/vnd.in-toto+json", b'{"a":1}'), ("", b""), ("t", "ü".encode())):
        assert pae(pt, body) == indep.pae(pt, body)


def test_key_files_refused_with_reasons() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from agent.trust.keys import load_private_pem, load_public_pem
    with pytest.raises(E.TrustError, match="not a PEM public key"):
        load_public_pem(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(E.TrustError, match="P-256"):
        load_public_pem(p384)
    s = Signer.create()
    encrypted = s.key.to_pem(b"pw")
    with pytest.raises(E.TrustError, match="passphrase"):
        load_private_pem(encrypted)
    with pytest.raises(E.TrustError, match="passphrase"):
        load_private_pem(encrypted, b"wrong")
    assert load_private_pem(encrypted, b"pw").public.key_id == s.key_id


def test_policy_bundle_errors_map_to_specific_codes() -> None:
    """The reader's own errors (real archives), classified by their code alone."""
    from agent.trust.artifacts import classify_bundle_error
    from agent.wasm.bundle import BundleError, read_bundle

    def code_of(blob: bytes, **limits: int) -> str:
        with pytest.raises(BundleError) as info:
            read_bundle(blob, **limits)
        return classify_bundle_error(info.value).code

    assert code_of(opa_bundle(extra=[("../x", b"x")])) == "unsafe_archive"
    assert code_of(opa_bundle(symlink="a")) == "unsafe_archive"
    assert code_of(opa_bundle(extra=[("/data.json", b"{}")])) == "unsafe_archive"  # appears twice
    assert code_of(opa_bundle(extra=[("big", b"x" * 99)]), max_member_bytes=50) == "oversize"
    assert code_of(opa_bundle(), max_members=2) == "oversize"
    assert code_of(opa_bundle(), max_total_bytes=10) == "oversize"
    # message text no longer decides: an uncoded error is a malformed bundle, whatever it says
    assert classify_bundle_error(BundleError("member escapes the bundle; over the limit")).code == "invalid_opa_bundle"
    assert classify_bundle_error(BundleError("x", code="bundle_unsafe")).code == "unsafe_archive"
    assert classify_bundle_error(BundleError("x", code="bundle_too_large")).code == "oversize"
