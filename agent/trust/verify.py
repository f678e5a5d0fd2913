"""The one verification path for releases — CLI install, USB stick and the fleet link all call this.

:func:`verify_release` is pure: bytes in, a :class:`VerifiedRelease` out, or a :class:`ReleaseRejected`
subclass whose ``code`` names the rule that failed. It reads no database and no clock; callers pass
the trust snapshot, the persisted version floor and the *trusted* time (see ``timekeeper``).

Order of checks (cheap and bytes-independent first, so junk is refused fast):
size → bundle → signature (unsigned / unknown_key / bad_signature) → statement → predicateType →
predicate → key scope → digest → validity window → version floor → agent version → artifact content.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from agent import __version__
from agent.trust.artifacts import check_artifact
from agent.trust.bundle import Bundle, parse_bundle
from agent.trust.dsse import INTOTO_PAYLOAD_TYPE, pae
from agent.trust.errors import (
    AgentTooOld,
    BadSignature,
    DigestMismatch,
    Expired,
    KeyOutOfScope,
    MalformedBundle,
    NotYetValid,
    Oversize,
    UnknownKey,
    VersionNotNewer,
    WrongPredicateType,
)
from agent.trust.predicate import RELEASE_PREDICATE_TYPE, ReleasePredicate, parse_predicate, version_tuple
from agent.trust.statement import Statement, parse_statement
from agent.trust.truststore import Role, TrustedKey, TrustSet

DEFAULT_MAX_ARTIFACT_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedRelease:
    """A release that passed every rule. ``predicate.raw`` keeps extra fields of the signed predicate."""

    sha256: str
    size: int
    predicate: ReleasePredicate
    signer_key_id: str
    artifact_format: str  # "wasm" | "opa_bundle"
    statement_type: str

    @property
    def kind(self) -> str:
        return self.predicate.kind

    @property
    def name(self) -> str:
        return self.predicate.name

    @property
    def version(self) -> int:
        return self.predicate.version


def _short(key_id: str) -> str:
    return key_id[:16]


def find_signer(bundle: Bundle, trust: TrustSet, role: Role) -> TrustedKey:
    """The trusted key of ``role`` whose signature over PAE verifies; else the precise rejection."""
    env = bundle.envelope
    message = pae(env.payload_type, env.payload)
    for sig in env.signatures:
        for key in trust.keys:
            if key.public.verify(sig.sig, message):
                if key.role != role:
                    raise KeyOutOfScope(
                        f"signed by {key.role} key {_short(key.key_id)}…, which may only sign "
                        f"{'key-set updates' if key.role == 'root' else 'releases'}, not this document")
                return key
    refs = [r for r in (bundle.key_hint, *(s.keyid for s in env.signatures)) if r]
    for ref in refs:
        known = trust.by_reference(ref)
        if known is not None:
            raise BadSignature(
                f"the signature does not verify under trusted key {_short(known.key_id)}… named by the bundle: "
                "the artifact metadata or the bundle was altered after signing (or signed with another key)")
    if refs:
        raise UnknownKey(f"the release is signed by key {refs[0]!r}, which is not in this gateway's trust store; "
                         "add its public key with 'edge-agent trust add' or re-sign with a trusted key")
    if not trust.with_role(role):
        raise UnknownKey(f"this gateway trusts no {role} keys yet; add one with 'edge-agent trust add'")
    raise BadSignature(f"the signature verifies under none of the {len(trust.with_role(role))} trusted {role} "
                       "key(s) (the bundle names no key): it was altered or signed by an unknown key")


def verify_statement(bundle_json: bytes, trust: TrustSet, role: Role,
                     predicate_type: str) -> tuple[Statement, TrustedKey]:
    """Bundle → signer → statement with the expected predicateType (shared with key-set updates)."""
    bundle = parse_bundle(bundle_json)
    if bundle.envelope.payload_type != INTOTO_PAYLOAD_TYPE:
        raise MalformedBundle(f"DSSE payloadType is {bundle.envelope.payload_type!r}, expected "
                              f"{INTOTO_PAYLOAD_TYPE!r}")
    signer = find_signer(bundle, trust, role)
    statement = parse_statement(bundle.envelope.payload)
    if statement.predicate_type != predicate_type:
        raise WrongPredicateType(f"predicateType is {statement.predicate_type!r}; this agent accepts "
                                 f"{predicate_type!r} here")
    return statement, signer


Floors = int | None | Mapping[tuple[str, str], int]


def verify_release(artifact: bytes, bundle_json: bytes, trust: TrustSet, floor: Floors, now: float, *,
                   agent_version: str = __version__, max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES,
                   check_content: bool = True) -> VerifiedRelease:
    """Check every release rule; return what was verified or raise the specific ``ReleaseRejected``.

    ``floor``: highest version ever activated for this kind+name (None = never), or a mapping
    (kind, name) → floor when the caller does not know kind+name before the signed statement is read
    (``ReleaseStore`` passes every floor, and re-checks inside its write transaction).
    ``now``: the trusted time (``timekeeper.trusted_now``), never the raw system clock.
    """
    if len(artifact) > max_artifact_bytes:
        raise Oversize(f"the artifact is {len(artifact)} bytes; this agent accepts at most {max_artifact_bytes}")
    statement, signer = verify_statement(bundle_json, trust, "release", RELEASE_PREDICATE_TYPE)
    predicate = parse_predicate(statement.predicate)
    if not signer.allows(predicate.kind, predicate.name):
        raise KeyOutOfScope(f"key {_short(signer.key_id)}… may sign {signer.scope_text}, not "
                            f"{predicate.kind} {predicate.name!r}")
    sha = hashlib.sha256(artifact).hexdigest()
    if sha != statement.subject_sha256:
        raise DigestMismatch(f"the artifact's sha256 {sha[:16]}… differs from the signed digest "
                             f"{statement.subject_sha256[:16]}…: wrong file or a corrupted copy")
    check_window(predicate, now)
    check_floor(predicate, floor.get((predicate.kind, predicate.name)) if isinstance(floor, Mapping) else floor)
    if predicate.min_agent_version and version_tuple(agent_version) < version_tuple(predicate.min_agent_version):
        raise AgentTooOld(f"{predicate.kind} {predicate.name} v{predicate.version} needs edge-agent >= "
                          f"{predicate.min_agent_version}; this is {agent_version}: upgrade the agent first")
    fmt = check_artifact(predicate.kind, artifact) if check_content else "unchecked"
    return VerifiedRelease(sha256=sha, size=len(artifact), predicate=predicate, signer_key_id=signer.key_id,
                           artifact_format=fmt, statement_type=statement.type)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def check_window(predicate: ReleasePredicate, now: float) -> None:
    if predicate.not_before is not None and now < predicate.not_before:
        raise NotYetValid(f"{predicate.kind} {predicate.name} v{predicate.version} is valid only from "
                          f"{iso(predicate.not_before)} (trusted time now {iso(now)})")
    if predicate.expires is not None and now >= predicate.expires:
        raise Expired(f"{predicate.kind} {predicate.name} v{predicate.version} expired at "
                      f"{iso(predicate.expires)} (trusted time now {iso(now)}); ask for a fresh release")


def check_floor(predicate: ReleasePredicate, floor: int | None) -> None:
    if floor is not None and predicate.version <= floor:
        raise VersionNotNewer(
            f"{predicate.kind} {predicate.name} v{predicate.version} is not newer than v{floor}, the highest version "
            "this gateway has run; a rollback must be published as a new, higher version")
