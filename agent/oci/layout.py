"""OCI image layouts on disk (image-spec ``image-layout.md``): the air-gap carrier of releases.

A layout is a directory with ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json``
(an image index) and ``blobs/sha256/<hex>``. ``oras copy --to-oci-layout`` and ``edge-fleet export``
write one; ``edge-agent install DIR`` reads one.

Reading trusts nothing: every blob path is derived from a validated digest (no path from the layout
is ever joined), every blob is size-bounded and re-hashed, the index nesting is bounded. What comes
out is candidate bytes and candidate bundles; the release verification decides.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agent import jsonsafe
from agent.oci.formats import (
    ANN_REF_NAME,
    BUNDLE_TYPES,
    INDEX,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Manifest,
    OciFormatError,
    build_index,
    bundle_layers,
    check_digest,
    digest_of,
    parse_index,
    parse_manifest,
    release_layer,
    tag_schema,
)

LAYOUT_VERSION = "1.0.0"
MAX_DEPTH = 4
MAX_MANIFESTS = 4096


class LayoutError(OciFormatError):
    code = "oci_layout_invalid"


@dataclass(frozen=True)
class LayoutRelease:
    """One release found in a layout: its bytes and every candidate signature for them."""

    ref_name: str
    manifest_digest: str
    artifact: bytes
    bundles: tuple[bytes, ...]


@dataclass
class Layout:
    path: Path
    max_blob_bytes: int = 64 * 1024 * 1024

    def blob_path(self, digest: str) -> Path:
        return self.path / "blobs" / "sha256" / check_digest(digest, "blob digest").split(":", 1)[1]

    def read_blob(self, digest: str, limit: int | None = None) -> bytes:
        p = self.blob_path(digest)
        limit = limit or self.max_blob_bytes
        try:
            if p.is_symlink() or not p.is_file():
                raise LayoutError(f"blob {digest[:19]}… is missing from the layout {self.path}")
            if p.stat().st_size > limit:
                raise LayoutError(f"blob {digest[:19]}… is {p.stat().st_size} bytes, over the limit of {limit}")
            data = p.read_bytes()
        except OSError as exc:
            raise LayoutError(f"blob {digest[:19]}… cannot be read: {exc.strerror}") from None
        if digest_of(data) != digest:
            raise LayoutError(f"blob {digest[:19]}… in {self.path} does not match its digest (corrupted copy)")
        return data

    def check(self) -> None:
        marker = self.path / "oci-layout"
        if not self.path.is_dir():
            raise LayoutError(f"{self.path} is not a directory (an OCI image layout is one)")
        try:
            with marker.open("rb") as fh:
                obj = jsonsafe.loads(fh.read(4097), jsonsafe.Limits(4096, max_depth=4))
        except OSError:
            raise LayoutError(f"{self.path} is not an OCI image layout: no oci-layout file") from None
        except jsonsafe.JsonRejected as exc:
            raise LayoutError(f"{marker} is not accepted JSON ({exc.code}): {exc}") from None
        if not isinstance(obj, dict) or obj.get("imageLayoutVersion") != LAYOUT_VERSION:
            raise LayoutError(f"{marker}: imageLayoutVersion must be {LAYOUT_VERSION!r}")

    def index(self) -> list[Descriptor]:
        self.check()
        try:
            raw = (self.path / "index.json").read_bytes()
        except OSError:
            raise LayoutError(f"{self.path} has no readable index.json") from None
        return list(parse_index(raw).manifests)

    def manifests(self) -> list[tuple[Descriptor, Manifest]]:
        """Every image manifest the index reaches (nested indexes followed, bounded), with its entry."""
        out: list[tuple[Descriptor, Manifest]] = []
        seen: set[str] = set()

        def walk(entries: Iterable[Descriptor], depth: int) -> None:
            for d in entries:
                if d.digest in seen or len(seen) >= MAX_MANIFESTS:
                    continue
                seen.add(d.digest)
                if d.media_type == INDEX:
                    if depth >= MAX_DEPTH:
                        raise LayoutError(f"indexes nested deeper than {MAX_DEPTH} in {self.path}")
                    walk(parse_index(self.read_blob(d.digest, MAX_MANIFEST_BYTES)).manifests, depth + 1)
                elif d.media_type in (MANIFEST, "application/vnd.docker.distribution.manifest.v2+json"):
                    out.append((d, parse_manifest(self.read_blob(d.digest, MAX_MANIFEST_BYTES))))
        walk(self.index(), 0)
        return out

    def releases(self) -> list[LayoutRelease]:
        """The release artifacts of the layout with their candidate bundles (bundled layers, referrers
        stored in the layout, the referrers-tag-schema index), in index order."""
        entries = self.manifests()
        referrers: dict[str, list[Manifest]] = {}
        for _d, m in entries:
            if m.subject is not None and m.type in BUNDLE_TYPES:
                referrers.setdefault(m.subject.digest, []).append(m)
        tagged = {d.annotations.get(ANN_REF_NAME, ""): d for d in self.index()}
        found: list[LayoutRelease] = []
        for d, m in entries:
            if m.type in BUNDLE_TYPES or (m.subject is not None) or m.type.startswith(
                    "application/vnd.edge-agent.desired-state"):
                continue
            layer = release_layer(m)
            artifact = self.read_blob(layer.digest)
            bundles = [self.read_blob(b.digest, 4 * 1024 * 1024) for b in bundle_layers(m)]
            refs = list(referrers.get(m.digest, []))
            schema = tagged.get(tag_schema(m.digest))
            if schema is not None and schema.media_type == INDEX:
                for entry in parse_index(self.read_blob(schema.digest, MAX_MANIFEST_BYTES)).manifests:
                    if entry.artifact_type in BUNDLE_TYPES and not any(x.digest == entry.digest for x in refs):
                        refs.append(parse_manifest(self.read_blob(entry.digest, MAX_MANIFEST_BYTES)))
            for ref in refs:
                bundles.extend(self.read_blob(b.digest, 4 * 1024 * 1024) for b in bundle_layers(ref))
            found.append(LayoutRelease(d.annotations.get(ANN_REF_NAME, ""), m.digest, artifact,
                                       tuple(dict.fromkeys(bundles))))
        if not found:
            raise LayoutError(f"the layout {self.path} holds no release artifact (no manifest with a Wasm or "
                              "policy layer)")
        return found


@dataclass
class LayoutWriter:
    """Adds blobs and manifests to a (new or existing) layout; ``close`` writes ``index.json`` last."""

    path: Path
    entries: list[Descriptor] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        marker = self.path / "oci-layout"
        if (self.path / "index.json").exists():
            Layout(self.path).check()
            self.entries = Layout(self.path).index()
        elif not marker.exists():
            marker.write_text(json.dumps({"imageLayoutVersion": LAYOUT_VERSION}))

    def blob(self, data: bytes) -> str:
        digest = digest_of(data)
        p = self.path / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not p.exists() or p.stat().st_size != len(data):
            tmp = p.with_suffix(".tmp")
            with tmp.open("wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(p)
        return digest

    def manifest(self, raw: bytes, *, media_type: str = MANIFEST, ref_name: str = "", artifact_type: str = "") -> str:
        digest = self.blob(raw)
        ann = {ANN_REF_NAME: ref_name} if ref_name else {}
        entry = Descriptor(media_type, digest, len(raw), annotations=ann, artifact_type=artifact_type)
        # a ref name points at one manifest only (re-export moves it); untagged entries are kept once
        self.entries = [e for e in self.entries if not (ref_name and e.annotations.get(ANN_REF_NAME) == ref_name)
                        and not (e.digest == digest and e.annotations.get(ANN_REF_NAME, "") == ref_name)]
        self.entries.append(entry)
        return digest

    def close(self) -> None:
        raw = build_index(self.entries)
        tmp = self.path / "index.json.tmp"
        tmp.write_bytes(raw)
        tmp.replace(self.path / "index.json")
