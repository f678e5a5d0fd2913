"""The release envelope: one retained MQTT message carrying a whole signed release.

Why one message and not split topics: a retained message is replaced atomically by the broker, so a
gateway can never see the artifact of one version with the bundle of another; one message is also
one delivery to deduplicate. The cost is base64 (+33 %); a 5 MB artifact makes a ~6.7 MB message,
well inside ``max_release_bytes`` (16 MiB by default) and the broker's ``message_size_limit``.

JSON object (``format`` = :data:`FORMAT`)::

    {"format": "edge-agent.release/v1",
     "kind": "policy", "name": "gate", "version": 7,      # hints: must equal the signed predicate
     "sha256": "<hex of the artifact>",
     "artifact": "<base64 of the artifact bytes>",
     "bundle": {... the Sigstore bundle JSON ...}}

Nothing in the envelope is trusted: kind/name/version are only used to coalesce a flood and to
name the status topic; the signed predicate decides (a mismatch is rejected after verification).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

from agent import jsonsafe
from agent.errors import AgentError

FORMAT = "edge-agent.release/v1"
ENVELOPE_MAX_DEPTH = 32  # the envelope holds the bundle, which holds nothing deep
STATEMENT_PEEK_LIMITS = jsonsafe.Limits(4 * 1024 * 1024, max_depth=32)


class EnvelopeError(AgentError):
    """A release message is not a well-formed envelope. ``code`` names the exact problem."""

    code = "envelope_malformed"


@dataclass(frozen=True)
class Envelope:
    kind: str
    name: str
    version: int
    sha256: str
    artifact: bytes
    bundle: dict[str, Any]

    @property
    def bundle_json(self) -> bytes:
        return jsonsafe.dumps(self.bundle).encode()


def encode(kind: str, name: str, version: int, artifact: bytes, bundle: dict[str, Any] | bytes | str) -> bytes:
    """Build the message ``edge-fleet push`` publishes."""
    bundle_obj = jsonsafe.loads(bundle, STATEMENT_PEEK_LIMITS) if isinstance(bundle, bytes | str) else bundle
    return jsonsafe.dumps({
        "format": FORMAT, "kind": kind, "name": name, "version": version,
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "artifact": base64.b64encode(artifact).decode("ascii"),
        "bundle": bundle_obj,
    }).encode()


def decode(payload: bytes, *, max_bytes: int, kind: str | None = None, name: str | None = None) -> Envelope:
    """Parse and sanity-check an envelope (blocking for big payloads: call via ``run_blocking``).

    ``kind``/``name`` are the ones in the topic; the envelope must agree with them.
    """
    if len(payload) > max_bytes:
        raise EnvelopeError(f"release message of {len(payload)} bytes exceeds the limit of {max_bytes} bytes "
                            "(fleet.max_release_bytes)", code="envelope_too_large")
    try:
        obj = jsonsafe.loads(payload, jsonsafe.Limits(max_bytes, max_depth=ENVELOPE_MAX_DEPTH))
    except jsonsafe.JsonRejected as exc:
        if exc.code == "json_integer_out_of_range" and exc.path == "$.version":
            raise EnvelopeError(f"release message version is past the largest version a gateway can store: {exc}",
                                code="version_out_of_range") from None
        raise EnvelopeError(f"release message is not accepted JSON ({exc.code}): {exc}",
                            code="envelope_not_json") from None
    if not isinstance(obj, dict):
        raise EnvelopeError("release message is not a JSON object", code="envelope_malformed")
    if obj.get("format") != FORMAT:
        raise EnvelopeError(f"release message format is {obj.get('format')!r}, expected {FORMAT!r}",
                            code="envelope_format_unknown")
    for key, tp in (("kind", str), ("name", str), ("sha256", str), ("artifact", str), ("bundle", dict)):
        if not isinstance(obj.get(key), tp):
            raise EnvelopeError(f"release message field {key!r} is missing or not a {tp.__name__}",
                                code="envelope_malformed")
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise EnvelopeError(f"release message field 'version' must be an integer >= 1, got {version!r}",
                            code="envelope_malformed")
    if kind is not None and (obj["kind"], obj["name"]) != (kind, name):
        raise EnvelopeError(f"release message names {obj['kind']}/{obj['name']} but was published on the topic "
                            f"of {kind}/{name}", code="envelope_topic_mismatch")
    try:
        artifact = base64.b64decode(obj["artifact"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"release artifact is not valid base64: {exc}", code="artifact_not_base64") from exc
    digest = hashlib.sha256(artifact).hexdigest()
    if digest != obj["sha256"].lower():
        raise EnvelopeError(f"release artifact sha256 {digest} does not match the envelope's {obj['sha256']} "
                            "(truncated or corrupted in transit)", code="artifact_digest_mismatch")
    return Envelope(kind=obj["kind"], name=obj["name"], version=version, sha256=digest,
                    artifact=artifact, bundle=obj["bundle"])


def signed_targets(bundle: dict[str, Any]) -> tuple[str, ...]:
    """The predicate's ``targets`` read WITHOUT verification — only to skip releases meant for other
    gateways early; whatever is installed is verified in full (targets included)."""
    try:
        env = bundle["dsseEnvelope"]
        statement = jsonsafe.loads(base64.b64decode(env["payload"], validate=True), STATEMENT_PEEK_LIMITS)
        targets = statement["predicate"].get("targets")
    except (KeyError, TypeError, AttributeError, ValueError, binascii.Error, jsonsafe.JsonRejected):
        return ()
    return tuple(t for t in targets if isinstance(t, str)) if isinstance(targets, list) else ()
