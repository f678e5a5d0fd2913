"""The fleet manager's release path through a registry: verify, push, point desired state, ring.

``edge-fleet publish`` = :func:`publish`: nothing leaves the workstation unless it verifies here
exactly as a gateway would verify it (against the public keys the fleet trusts, ``--trust``); the
desired state of each target scope is read back, verified under the same keys, changed for this
release only, signed and pushed; the doorbell (optional) rings last. Each step's result is read back
from the registry or broker before it is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError
from agent.fleet.registry import (
    desired_repository,
    doorbell_payload,
    doorbell_topic,
    release_repository,
    scope_tag,
)
from agent.fleet.topics import Scope
from agent.oci.formats import (
    OciFormatError,
    desired_manifest,
    now_rfc3339,
    parse_manifest,
    release_artifact,
    release_layer,
)
from agent.oci.publish import Publisher, PushReport
from agent.trust.desired import DesiredRelease, DesiredState, sign_desired, verify_desired
from agent.trust.errors import ReleaseRejected
from agent.trust.keys import PrivateKey
from agent.trust.predicate import RELEASE_PREDICATE_TYPE
from agent.trust.truststore import TrustSet
from agent.trust.verify import VerifiedRelease, verify_release

NO_AGENT_LIMIT = "999999"


class PublishRefused(AgentError):
    """``publish`` refused before writing anything (the message names the flag that fixes it)."""

    code = "publish_refused"


@dataclass
class ScopeReport:
    scope: str
    tag: str
    sequence: int
    digest: str
    changed: bool
    doorbell: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"scope": self.scope, "tag": self.tag, "sequence": self.sequence, "digest": self.digest,
                "changed": self.changed, "doorbell": self.doorbell}


@dataclass
class PublishReport:
    kind: str
    name: str
    version: int
    sha256: str
    signer: str
    release: PushReport
    scopes: list[ScopeReport] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "version": self.version, "sha256": self.sha256,
                "signer": self.signer, "release": self.release.to_json(),
                "scopes": [s.to_json() for s in self.scopes], "seconds": round(self.seconds, 3)}


def verify_locally(artifact: bytes, bundle: bytes, trust: TrustSet) -> VerifiedRelease:
    """The gateway's checks (signature under a ``--trust`` key, scope, digest, content), now."""
    if not trust.keys:
        raise PublishRefused("no public key to verify against: give the fleet's key(s) with --trust PUB.pem")
    try:
        # min_agent_version is the gateways' business: this tool's own version says nothing about theirs
        return verify_release(artifact, bundle, trust, None, time.time(), agent_version=NO_AGENT_LIMIT)
    except ReleaseRejected as exc:
        raise PublishRefused(f"the release does not verify under the --trust key(s) [{exc.code}]: {exc}",
                             code=exc.code) from None


def next_desired(current: DesiredState | None, scope: str, entry: DesiredRelease) -> DesiredState | None:
    """The document to publish (None: it already says exactly this)."""
    if current is not None:
        have = current.entry(entry.kind, entry.name)
        if have is not None and have.version > entry.version:
            raise PublishRefused(f"the desired state of {scope} already names {entry.kind} {entry.name} "
                                 f"v{have.version}, newer than v{entry.version}: a rollback is a new, higher version "
                                 "(re-sign the old bytes as the next version)", code="version_not_newer")
        if have == entry:
            return None
        return current.with_release(entry, sequence=current.sequence + 1, issued_at=now_rfc3339())
    return DesiredState(scope, 1, now_rfc3339(), (entry,))


def publish(publisher: Publisher, *, artifact: bytes, bundle: bytes, targets: Sequence[Scope], repo_prefix: str,
            trust: TrustSet, signing_key: PrivateKey, replace_desired: bool = False,
            subject_name: str = "") -> PublishReport:
    started = time.perf_counter()
    v = verify_locally(artifact, bundle, trust)
    signer = next((k for k in trust.keys if k.key_id == signing_key.public.key_id), None)
    if signer is None:
        raise PublishRefused(f"the --signing-key (key {signing_key.public.key_id[:16]}) is not among the --trust keys: "
                             "gateways would refuse the desired state it signs; add its .pub to --trust")
    if not signer.allows(v.kind, v.name):
        raise PublishRefused(f"the --signing-key may sign {signer.scope_text}, not {v.kind} {v.name}")
    repo = release_repository(repo_prefix, v.kind, v.name)
    tags = [(str(s), scope_tag(s)) for s in targets]
    desired_repo = desired_repository(repo_prefix)
    existing = publisher.get_manifest(repo, f"v{v.version}")
    if existing is not None:  # a version is immutable: the same bytes again only add a signature
        try:
            release_layer(parse_manifest(existing), v.sha256)
        except OciFormatError:
            raise PublishRefused(f"{repo}:v{v.version} already exists in the registry with other bytes; a version "
                                 "is published once: sign and publish the next version",
                                 code="version_exists") from None
    art = release_artifact(v.kind, v.name, v.version, artifact, bundle, title=subject_name,
                           predicate_type=RELEASE_PREDICATE_TYPE, existing=existing)
    # every target's current desired state is read and judged before anything is written
    plans: list[tuple[str, str, DesiredState | None]] = []
    entry = DesiredRelease(v.kind, v.name, v.version, v.sha256, art.digest, repo, art.bundle_layer.digest)
    for scope, tag in tags:
        current = None
        found = publisher.current_desired(desired_repo, tag)
        if found is not None and not replace_desired:
            try:
                current = verify_desired(found[1], trust, scope=scope, min_sequence=None)
            except ReleaseRejected as exc:
                raise PublishRefused(f"the registry's desired state for {scope} ({desired_repo}:{tag}) does not verify "
                                     f"under the --trust keys [{exc.code}]: {exc}. Publishing on top of it would sign "
                                     "what it says; use --replace-desired to start it afresh with this release only",
                                     code=exc.code) from None
        elif found is not None:
            from agent.trust.desired import read_desired_unverified
            try:  # keep counting up: gateways refuse a lower sequence than they have seen
                old = read_desired_unverified(found[1])
                current = DesiredState(scope, old.sequence, old.issued_at, ())
            except ReleaseRejected:
                current = None
        if current is not None and not current.releases:
            plans.append((scope, tag, DesiredState(scope, current.sequence + 1, now_rfc3339(), (entry,))))
        else:
            plans.append((scope, tag, next_desired(current, scope, entry)))
    report = PublishReport(kind=v.kind, name=v.name, version=v.version, sha256=v.sha256,
                           signer=v.signer_key_id, release=publisher.push_release(repo, f"v{v.version}", art))
    for scope, tag, state in plans:
        if state is None:
            found = publisher.current_desired(desired_repo, tag)
            assert found is not None
            seq = verify_desired(found[1], trust, scope=scope, min_sequence=None).sequence
            report.scopes.append(ScopeReport(scope, tag, seq, found[0], changed=False))
            continue
        signed = sign_desired(signing_key, state)
        verify_desired(signed, trust, scope=scope, min_sequence=state.sequence)  # what gateways will check
        manifest, _layer = desired_manifest(signed, scope, state.sequence)
        pushed = publisher.push_desired(desired_repo, tag, manifest, signed)
        report.scopes.append(ScopeReport(scope, tag, state.sequence, pushed.digest, changed=True))
    report.seconds = time.perf_counter() - started
    return report


async def ring(link: Any, topic_prefix: str, scopes: list[ScopeReport], *, timeout_s: float = 10.0) -> None:
    """Publish each scope's doorbell (retained, QoS 1) and read it back; a broker that dropped it
    (ACL) is an error naming the topic. ``link`` is a :class:`agent.fleet.link.LinkConfig`."""
    import aiomqtt

    from agent.fleet.link import client_kwargs

    try:
        async with asyncio.timeout(timeout_s), aiomqtt.Client(**client_kwargs(link)) as client:
            for s in scopes:
                scope = Scope.parse(s.scope)
                topic = doorbell_topic(topic_prefix, scope)
                payload = doorbell_payload(scope, s.digest, s.sequence)
                await client.publish(topic, payload, qos=1, retain=True)
                s.doorbell = topic
            for s in scopes:
                await client.subscribe(s.doorbell, qos=1)
            want = {s.doorbell: doorbell_payload(Scope.parse(s.scope), s.digest, s.sequence) for s in scopes}
            async for msg in client.messages:
                if want.get(str(msg.topic)) == msg.payload:
                    del want[str(msg.topic)]
                if not want:
                    break
    except TimeoutError:
        missing = ", ".join(t for t in (s.doorbell for s in scopes) if t)
        raise AgentError(f"the broker did not keep the doorbell on {missing} (an ACL that drops the publish?); "
                         "gateways still find the release by their timer", code="doorbell_not_confirmed") from None
    except aiomqtt.MqttError as exc:
        raise AgentError(f"the doorbell could not be published to {link.url}: {exc}; gateways still find the "
                         "release by their timer (check --broker)", code="doorbell_failed") from exc
