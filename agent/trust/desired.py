"""Desired state: which release of each kind/name a scope of gateways should run, signed like a release.

The document is the predicate ``urn:edge-agent:desired-state:v1`` of an in-toto statement in a DSSE
envelope in a Sigstore bundle — the same format, keys and checks as a release (key role
``release``; the key's kinds/names scope must allow every entry). Its subjects are the artifacts it
points at (``<kind>/<name>`` → sha256), so the statement is about exactly those bytes::

    {"scope": "site/plant-a", "sequence": 12, "issued_at": "2026-12-02T17:00:00Z",
     "releases": [{"kind": "policy", "name": "gate", "version": 7,
                   "sha256": "<artifact sha256>", "digest": "sha256:<release manifest digest>",
                   "repository": "edge/policy/gate", "bundle": "sha256:<its Sigstore bundle blob>"}]}

``sequence`` rises with every document published for the scope; a gateway refuses a document whose
sequence is below the highest it has verified for that scope (an old, genuinely signed document
replayed by a registry or a mirror cannot make it forget a newer one). The gateway also refuses a
document whose ``scope`` is not the one it asked for (a document re-tagged from another scope).

A verified desired state only says what *should* run: each release it names still goes through the
whole release verification (signature, floor, content) before anything is stored or run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from agent import jsonsafe
from agent.trust.bundle import build_bundle, dump_bundle
from agent.trust.dsse import INTOTO_PAYLOAD_TYPE, Envelope, Signature, pae
from agent.trust.errors import KeyOutOfScope, MalformedPredicate, ReleaseRejected
from agent.trust.keys import PrivateKey
from agent.trust.predicate import KINDS, NAME_RE
from agent.trust.statement import STATEMENT_V1
from agent.trust.truststore import TrustSet
from agent.trust.verify import verify_statement

DESIRED_PREDICATE_TYPE = "urn:edge-agent:desired-state:v1"
SCOPE_RE = re.compile(r"^(all|(site|group|gw)/[^/+#\x00\s]{1,128})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")
MAX_ENTRIES = 256


class DesiredStateReplayed(ReleaseRejected):
    """A desired-state document older (lower sequence) than one already verified for its scope."""

    code = "desired_state_replayed"


class DesiredStateWrongScope(ReleaseRejected):
    """A document signed for another scope than the one it was fetched as."""

    code = "desired_state_wrong_scope"


@dataclass(frozen=True)
class DesiredRelease:
    kind: str
    name: str
    version: int
    sha256: str
    digest: str
    repository: str
    bundle: str = ""  # sha256:<digest> of the release's Sigstore bundle blob (optional: saves a referrer lookup)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "name": self.name, "version": self.version, "sha256": self.sha256,
                               "digest": self.digest, "repository": self.repository}
        if self.bundle:
            out["bundle"] = self.bundle
        return out


@dataclass(frozen=True)
class DesiredState:
    scope: str
    sequence: int
    issued_at: str
    releases: tuple[DesiredRelease, ...]
    signer_key_id: str = ""

    def to_predicate(self) -> dict[str, Any]:
        return {"scope": self.scope, "sequence": self.sequence, "issued_at": self.issued_at,
                "releases": [r.to_json() for r in self.releases]}

    def entry(self, kind: str, name: str) -> DesiredRelease | None:
        return next((r for r in self.releases if (r.kind, r.name) == (kind, name)), None)

    def with_release(self, release: DesiredRelease, *, sequence: int, issued_at: str) -> DesiredState:
        """This state with ``release`` replacing the entry of its kind/name (the next document)."""
        others = [r for r in self.releases if (r.kind, r.name) != (release.kind, release.name)]
        return DesiredState(self.scope, sequence, issued_at, (*others, release))


def check_scope(scope: str) -> str:
    if not SCOPE_RE.match(scope):
        raise MalformedPredicate(f"desired-state scope {scope!r} must be all, site/<site>, group/<group> or "
                                 "gw/<node-id>")
    return scope


def _entry(obj: object, i: int) -> DesiredRelease:
    where = f"predicate.releases[{i}]"
    if not isinstance(obj, dict):
        raise MalformedPredicate(f"{where} must be an object")
    kind, name, version = obj.get("kind"), obj.get("name"), obj.get("version")
    if kind not in KINDS:
        raise MalformedPredicate(f"{where}.kind must be one of {', '.join(KINDS)}")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise MalformedPredicate(f"{where}.name {name!r} is not a release name")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise MalformedPredicate(f"{where}.version must be an integer >= 1")
    sha, digest, repo = obj.get("sha256"), obj.get("digest"), obj.get("repository")
    if not isinstance(sha, str) or not _HEX64.match(sha):
        raise MalformedPredicate(f"{where}.sha256 must be 64 lower-case hex digits")
    if not isinstance(digest, str) or not _DIGEST.match(digest):
        raise MalformedPredicate(f"{where}.digest must be sha256:<64 hex> (the release manifest)")
    if not isinstance(repo, str) or len(repo) > 255 or not _REPO.match(repo):
        raise MalformedPredicate(f"{where}.repository {repo!r} is not an OCI repository name")
    bundle = obj.get("bundle", "")
    if bundle != "" and (not isinstance(bundle, str) or not _DIGEST.match(bundle)):
        raise MalformedPredicate(f"{where}.bundle must be sha256:<64 hex> (the release's signature blob)")
    return DesiredRelease(str(kind), name, version, sha, digest, repo, str(bundle))


def parse_desired(obj: object) -> DesiredState:
    if not isinstance(obj, dict):
        raise MalformedPredicate("the desired-state predicate must be a JSON object")
    scope, sequence, issued = obj.get("scope"), obj.get("sequence"), obj.get("issued_at", "")
    if not isinstance(scope, str):
        raise MalformedPredicate("predicate.scope must be a string")
    check_scope(scope)
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 1:
        raise MalformedPredicate("predicate.sequence must be an integer >= 1")
    releases = obj.get("releases")
    if not isinstance(releases, list) or not releases or len(releases) > MAX_ENTRIES:
        raise MalformedPredicate(f"predicate.releases must list 1 to {MAX_ENTRIES} releases")
    entries = tuple(_entry(x, i) for i, x in enumerate(releases))
    if len({(e.kind, e.name) for e in entries}) != len(entries):
        raise MalformedPredicate("predicate.releases names one kind/name twice")
    return DesiredState(scope, sequence, issued if isinstance(issued, str) else "", entries)


def sign_desired(key: PrivateKey, state: DesiredState) -> bytes:
    """The Sigstore bundle (JSON bytes) of ``state``; refuses what no gateway would accept."""
    predicate = state.to_predicate()
    parse_desired(predicate)
    statement = {
        "_type": STATEMENT_V1,
        "subject": [{"name": f"{r.kind}/{r.name}", "digest": {"sha256": r.sha256}} for r in state.releases],
        "predicateType": DESIRED_PREDICATE_TYPE,
        "predicate": predicate,
    }
    payload = jsonsafe.dumps(statement).encode()  # what no gateway accepts (NaN, 1e400) cannot be signed
    envelope = Envelope(payload_type=INTOTO_PAYLOAD_TYPE, payload=payload,
                        signatures=(Signature(sig=key.sign(pae(INTOTO_PAYLOAD_TYPE, payload)), keyid=""),))
    return dump_bundle(build_bundle(envelope, key.public.hint))


def read_desired_unverified(bundle_json: bytes) -> DesiredState:
    """The document in a bundle WITHOUT checking its signature (the publisher's read-modify-write of
    its own last document; never for deciding what runs)."""
    from agent.trust.bundle import parse_bundle
    from agent.trust.statement import parse_statement

    statement = parse_statement(parse_bundle(bundle_json).envelope.payload)
    return parse_desired(statement.predicate)


def verify_desired(bundle_json: bytes, trust: TrustSet, *, scope: str, min_sequence: int | None) -> DesiredState:
    """Signature under a trusted release key whose scope allows every entry, the expected scope, and a
    sequence not below ``min_sequence`` (the highest verified before). Raises ``ReleaseRejected``."""
    statement, signer = verify_statement(bundle_json, trust, "release", DESIRED_PREDICATE_TYPE)
    state = parse_desired(statement.predicate)
    for r in state.releases:
        if not signer.allows(r.kind, r.name):
            raise KeyOutOfScope(f"key {signer.key_id[:16]}… may sign {signer.scope_text}, not desired state for "
                                f"{r.kind} {r.name!r}")
    if statement.subject_sha256 != state.releases[0].sha256:
        raise MalformedPredicate("the statement's subject is not the first release of its desired state")
    if state.scope != scope:
        raise DesiredStateWrongScope(f"the desired state was signed for scope {state.scope!r} but was fetched as "
                                     f"{scope!r}: a document copied to the wrong tag")
    if min_sequence is not None and state.sequence < min_sequence:
        raise DesiredStateReplayed(f"desired state #{state.sequence} for {scope} is older than #{min_sequence}, "
                                   "already verified here: an old document replayed (stale mirror or tampering)")
    return DesiredState(state.scope, state.sequence, state.issued_at, state.releases, signer.key_id)
