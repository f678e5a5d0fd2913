"""The OCI shapes of edge-agent releases (documented in ``docs/registry.md``).

A **release** is an OCI image manifest (image-spec 1.1) with
- ``artifactType`` ``application/vnd.edge-agent.release.<kind>.v1``, the empty config
  (``application/vnd.oci.empty.v1+json``, ``{}``),
- one layer: the Wasm module or the policy (``application/wasm``; an OPA bundle is
  ``application/vnd.oci.image.layer.v1.tar+gzip``, as OPA itself stores bundles),
- annotations with the release metadata (kind, name, version, artifact sha256, creation time) —
  hints for people and tools: the gateway trusts only the signed statement.

Its **signature** is the release's Sigstore bundle, attached as cosign attaches bundles: a manifest
with ``artifactType`` = the bundle media type, the bundle as its one layer, ``subject`` = the release
manifest. Registries with the referrers API index it themselves; on the others (distribution 2.8)
the publisher maintains the OCI *referrers tag schema*: an image index tagged ``sha256-<hex>`` (the
subject digest with ``:`` → ``-``) listing the referrers. Tools without referrer support may instead
put the bundle as a second layer of the release manifest ("bundled" form); the gateway accepts both.

**Desired state** for a scope is a manifest with ``artifactType``
``application/vnd.edge-agent.desired-state.v1+json`` whose one layer is a Sigstore bundle (the
signed document itself): tag and signature move together, so a reader never sees one without the
other.

Everything read here is untrusted input: sizes are bounded, JSON shapes are checked, and digests
are recomputed by the callers before anything is used.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agent import jsonsafe
from agent.errors import AgentError

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_BYTES = b"{}"
EMPTY_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"

ARTIFACT_MODULE = "application/vnd.edge-agent.release.module.v1"
ARTIFACT_POLICY = "application/vnd.edge-agent.release.policy.v1"
ARTIFACT_TYPES = {"module": ARTIFACT_MODULE, "policy": ARTIFACT_POLICY}
ARTIFACT_DESIRED = "application/vnd.edge-agent.desired-state.v1+json"
BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
BUNDLE_TYPES = (BUNDLE, "application/vnd.dev.sigstore.bundle+json;version=0.3")

LAYER_WASM = "application/wasm"
LAYER_OPA_BUNDLE = "application/vnd.oci.image.layer.v1.tar+gzip"

ANN_TITLE = "org.opencontainers.image.title"
ANN_VERSION = "org.opencontainers.image.version"
ANN_CREATED = "org.opencontainers.image.created"
ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_KIND = "dev.edge-agent.release.kind"
ANN_NAME = "dev.edge-agent.release.name"
ANN_RELEASE_VERSION = "dev.edge-agent.release.version"
ANN_SHA256 = "dev.edge-agent.release.sha256"
ANN_SCOPE = "dev.edge-agent.desired-state.scope"
ANN_SEQUENCE = "dev.edge-agent.desired-state.sequence"
ANN_BUNDLE_CONTENT = "dev.sigstore.bundle.content"
ANN_BUNDLE_PREDICATE = "dev.sigstore.bundle.predicateType"

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # distribution's own limit for manifests
MANIFEST_LIMITS = jsonsafe.Limits(MAX_MANIFEST_BYTES, max_depth=32)
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_REPO = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$")


class OciFormatError(AgentError):
    """A manifest, index or layout that does not have the shape it must have."""

    code = "oci_malformed"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _DIGEST.match(value):
        raise OciFormatError(f"{what} must be a sha256 digest (sha256:<64 hex>), got {value!r:.80}")
    return value


def check_tag(value: str, what: str = "tag") -> str:
    if not _TAG.match(value):
        raise OciFormatError(f"{what} {value!r} is not a valid OCI tag (letters, digits, '_', '.', '-'; "
                             "at most 128; not starting with '.' or '-')")
    return value


def check_repository(value: str) -> str:
    if not value or len(value) > 255 or not _REPO.match(value):
        raise OciFormatError(f"repository {value!r} is not a valid OCI repository name (lower-case letters, "
                             "digits, '.', '_', '-', separated by '/')")
    return value


def tag_schema(digest: str) -> str:
    """The referrers tag schema's tag for ``digest``: ``<alg>-<hex>`` (distribution spec 1.1)."""
    alg, _, hexpart = check_digest(digest, "subject digest").partition(":")
    return f"{alg[:32]}-{hexpart[:64]}"


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def canonical(obj: dict[str, Any]) -> bytes:
    """Compact, key-sorted JSON: the bytes whose digest names the manifest."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    artifact_type: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def of(cls, media_type: str, data: bytes, **kw: Any) -> Descriptor:
        return cls(media_type, digest_of(data), len(data), **kw)


def parse_descriptor(obj: object, what: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise OciFormatError(f"{what} must be a JSON object")
    media_type, size = obj.get("mediaType"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise OciFormatError(f"{what}.mediaType is missing")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise OciFormatError(f"{what}.size must be a non-negative integer")
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise OciFormatError(f"{what}.annotations must map strings to strings")
    art = obj.get("artifactType", "")
    return Descriptor(media_type, check_digest(obj.get("digest"), f"{what}.digest"), size, dict(ann),
                      art if isinstance(art, str) else "")


@dataclass(frozen=True)
class Manifest:
    """An image manifest as read (``raw`` = its exact bytes, whose digest names it)."""

    raw: bytes
    media_type: str
    artifact_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    subject: Descriptor | None
    annotations: dict[str, str]

    @property
    def digest(self) -> str:
        return digest_of(self.raw)

    def descriptor(self, **kw: Any) -> Descriptor:
        return Descriptor(MANIFEST, self.digest, len(self.raw), **kw)

    @property
    def type(self) -> str:
        """The artifact type as image-spec 1.1 defines it: ``artifactType``, else the config media type."""
        return self.artifact_type or self.config.media_type


@dataclass(frozen=True)
class Index:
    raw: bytes
    manifests: tuple[Descriptor, ...]
    annotations: dict[str, str]


def _load(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise OciFormatError(f"{what} of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES} bytes")
    try:
        obj = jsonsafe.loads(raw, MANIFEST_LIMITS)
    except jsonsafe.JsonRejected as exc:
        raise OciFormatError(f"{what} is not accepted JSON ({exc.code}): {exc}") from None
    if not isinstance(obj, dict):
        raise OciFormatError(f"{what} is not a JSON object")
    if obj.get("schemaVersion") != 2:
        raise OciFormatError(f"{what} has schemaVersion {obj.get('schemaVersion')!r}, expected 2")
    return obj


def _annotations(obj: dict[str, Any], what: str) -> dict[str, str]:
    ann = obj.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise OciFormatError(f"{what}.annotations must map strings to strings")
    return dict(ann)


def parse_manifest(raw: bytes) -> Manifest:
    obj = _load(raw, "manifest")
    media_type = obj.get("mediaType", MANIFEST)
    if media_type not in (MANIFEST, DOCKER_MANIFEST):
        raise OciFormatError(f"manifest mediaType {media_type!r} is not an image manifest")
    layers = obj.get("layers")
    if not isinstance(layers, list):
        raise OciFormatError("manifest.layers must be a list")
    subject = parse_descriptor(obj["subject"], "manifest.subject") if obj.get("subject") else None
    art = obj.get("artifactType", "")
    return Manifest(raw=raw, media_type=str(media_type), artifact_type=art if isinstance(art, str) else "",
                    config=parse_descriptor(obj.get("config"), "manifest.config"),
                    layers=tuple(parse_descriptor(x, f"manifest.layers[{i}]") for i, x in enumerate(layers)),
                    subject=subject, annotations=_annotations(obj, "manifest"))


def parse_index(raw: bytes) -> Index:
    obj = _load(raw, "index")
    if obj.get("mediaType", INDEX) != INDEX:
        raise OciFormatError(f"index mediaType {obj.get('mediaType')!r} is not {INDEX!r}")
    manifests = obj.get("manifests")
    if not isinstance(manifests, list):
        raise OciFormatError("index.manifests must be a list")
    return Index(raw=raw, manifests=tuple(parse_descriptor(x, f"index.manifests[{i}]")
                                          for i, x in enumerate(manifests)),
                 annotations=_annotations(obj, "index"))


def build_manifest(*, artifact_type: str, layers: list[Descriptor], annotations: dict[str, str],
                   subject: Descriptor | None = None) -> bytes:
    obj: dict[str, Any] = {
        "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": artifact_type,
        "config": {"mediaType": EMPTY, "digest": EMPTY_DIGEST, "size": len(EMPTY_BYTES)},
        "layers": [d.to_json() for d in layers],
    }
    if subject is not None:
        obj["subject"] = {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size}
    if annotations:
        obj["annotations"] = annotations
    return canonical(obj)


def build_index(manifests: list[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [d.to_json() for d in manifests]}
    if annotations:
        obj["annotations"] = annotations
    return canonical(obj)


def layer_media_type(kind: str, artifact: bytes) -> str:
    """``application/wasm`` for Wasm bytes; an OPA bundle (gzip) is a tar+gzip layer."""
    return LAYER_OPA_BUNDLE if kind == "policy" and artifact[:2] == b"\x1f\x8b" else LAYER_WASM


@dataclass(frozen=True)
class ReleaseArtifact:
    """What ``publish`` writes for one release: the blobs and the two manifests."""

    artifact: bytes
    bundle: bytes
    layer: Descriptor
    bundle_layer: Descriptor
    manifest: bytes
    referrer: bytes

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    @property
    def referrer_descriptor(self) -> Descriptor:
        return Descriptor(MANIFEST, digest_of(self.referrer), len(self.referrer), artifact_type=BUNDLE,
                          annotations=bundle_annotations(self.created))

    @property
    def created(self) -> str:
        return str(json.loads(self.referrer).get("annotations", {}).get(ANN_CREATED, ""))


def bundle_annotations(created: str, predicate_type: str = "") -> dict[str, str]:
    ann = {ANN_BUNDLE_CONTENT: "dsse-envelope", ANN_CREATED: created}
    if predicate_type:
        ann[ANN_BUNDLE_PREDICATE] = predicate_type
    return ann


def release_artifact(kind: str, name: str, version: int, artifact: bytes, bundle: bytes, *,
                     title: str = "", predicate_type: str = "", created: str | None = None,
                     existing: bytes | None = None) -> ReleaseArtifact:
    """Build the release manifest and its bundle referrer (nothing is uploaded here).

    ``existing``: the manifest already in the registry for this version (its layer must be these
    bytes): it is kept as it is, so publishing again changes no digest and only adds a signature."""
    created = created or now_rfc3339()
    sha = hashlib.sha256(artifact).hexdigest()
    layer = Descriptor.of(layer_media_type(kind, artifact), artifact,
                          annotations={ANN_TITLE: title or f"{name}.wasm"})
    if existing is not None:
        manifest = existing
        layer = release_layer(parse_manifest(existing), sha)
    else:
        manifest = build_manifest(artifact_type=ARTIFACT_TYPES[kind], layers=[layer], annotations={
            ANN_KIND: kind, ANN_NAME: name, ANN_RELEASE_VERSION: str(version), ANN_SHA256: sha,
            ANN_VERSION: str(version), ANN_CREATED: created, ANN_TITLE: f"{kind} {name} v{version}"})
    bundle_layer = Descriptor.of(BUNDLE, bundle)
    referrer = build_manifest(artifact_type=BUNDLE, layers=[bundle_layer],
                              annotations=bundle_annotations(created, predicate_type),
                              subject=Descriptor(MANIFEST, digest_of(manifest), len(manifest)))
    return ReleaseArtifact(artifact=artifact, bundle=bundle, layer=layer, bundle_layer=bundle_layer,
                           manifest=manifest, referrer=referrer)


def desired_manifest(bundle: bytes, scope: str, sequence: int, created: str | None = None) -> tuple[bytes, Descriptor]:
    """The desired-state manifest for a signed document (the bundle) and the bundle's descriptor."""
    layer = Descriptor.of(BUNDLE, bundle)
    manifest = build_manifest(artifact_type=ARTIFACT_DESIRED, layers=[layer], annotations={
        ANN_SCOPE: scope, ANN_SEQUENCE: str(sequence), ANN_CREATED: created or now_rfc3339()})
    return manifest, layer


def referrers_with_bundles(index: Index) -> list[Descriptor]:
    """The index entries that are Sigstore bundles, newest first (by their ``created`` annotation)."""
    found = [d for d in index.manifests if d.artifact_type in BUNDLE_TYPES]
    return sorted(found, key=lambda d: d.annotations.get(ANN_CREATED, ""), reverse=True)


def add_referrer(existing: Index | None, entry: Descriptor) -> bytes | None:
    """The referrers-tag-schema index with ``entry`` added (None: already listed, nothing to write)."""
    current = list(existing.manifests) if existing is not None else []
    if any(d.digest == entry.digest for d in current):
        return None
    return build_index([*current, entry], existing.annotations if existing is not None else None)


def bundle_layers(manifest: Manifest) -> list[Descriptor]:
    return [d for d in manifest.layers if d.media_type in BUNDLE_TYPES]


def release_layer(manifest: Manifest, sha256: str | None = None) -> Descriptor:
    """The layer holding the release bytes: the one with ``sha256`` if given (the signed desired state
    names it), else the only layer that is not a bundle."""
    if sha256 is not None:
        want = f"sha256:{sha256}"
        for d in manifest.layers:
            if d.digest == want:
                return d
        raise OciFormatError(f"the manifest {manifest.digest[:19]}… has no layer with digest {want[:19]}… "
                             "(the desired state and the artifact disagree)")
    candidates = [d for d in manifest.layers if d.media_type not in BUNDLE_TYPES]
    if len(candidates) != 1:
        raise OciFormatError(f"the manifest {manifest.digest[:19]}… has {len(candidates)} non-signature layers; "
                             "a release artifact has exactly one (the Wasm module or the policy)")
    return candidates[0]
