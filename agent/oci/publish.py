"""The fleet manager's side: push releases and desired state to a registry with oras-py.

oras-py (the ORAS project's Python SDK) does the transport: the blob upload sessions, manifest PUTs,
and the registry auth dance. What it lacks is written here on top of its ``Registry``: the
artifact manifests themselves (oras-py's ``push`` cannot set ``artifactType``), the choice between
the referrers API and the referrers tag schema, and reading everything back, so that ``publish``
only reports what the registry really holds.

It is a workstation tool: it blocks. Errors name the flag that fixes them.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import AgentError
from agent.oci.formats import (
    BUNDLE_TYPES,
    EMPTY,
    EMPTY_BYTES,
    INDEX,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    Descriptor,
    Index,
    OciFormatError,
    ReleaseArtifact,
    add_referrer,
    digest_of,
    parse_index,
    parse_manifest,
    tag_schema,
)


class PublishError(AgentError):
    code = "publish_failed"


@dataclass(frozen=True)
class RegistryTarget:
    """``--registry`` (scheme://host:port), ``--repo-prefix``, ``--registry-ca``, credentials."""

    url: str
    username: str = ""
    password: str = ""
    ca: str = ""
    timeout_s: float = 30.0

    @property
    def host(self) -> str:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise PublishError(f"--registry {self.url!r} must look like https://host[:port] (no path; put the "
                               "repository prefix in --repo-prefix)", code="usage")
        return parts.netloc

    @property
    def insecure(self) -> bool:
        return urlsplit(self.url).scheme == "http"


@dataclass
class Referrers:
    """How the bundle referrer is found on this registry: ``api`` or ``tag-schema``."""

    mode: str
    index: Index | None = None


@dataclass
class PushReport:
    repository: str
    tag: str
    digest: str
    referrer: str = ""
    referrers_mode: str = ""
    blobs: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    verified: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"repository": self.repository, "tag": self.tag, "digest": self.digest, "referrer": self.referrer,
                "referrers": self.referrers_mode, "blobs": self.blobs, "bytes_uploaded": self.bytes_uploaded,
                "verified": self.verified}


def choose_referrers_mode(put_headers: dict[str, str], subject_digest: str) -> str:
    """After PUTting a manifest with a ``subject``: a registry with the referrers API names it in
    ``OCI-Subject`` (distribution spec 1.1); without that header the client keeps the tag schema."""
    names = {k.lower(): v for k, v in put_headers.items()}
    return "api" if names.get("oci-subject", "") == subject_digest else "tag-schema"


class Publisher:
    """oras-py's ``Registry`` with the checks ``publish`` needs."""

    def __init__(self, target: RegistryTarget) -> None:
        try:
            import oras.provider
        except ImportError as exc:
            raise PublishError("edge-fleet publish needs the ORAS SDK: pip install 'edge-agent[fleet]'",
                               code="missing_dependency") from exc
        self.target = target
        self.host = target.host
        backend = self._auth_backend()
        self.registry = oras.provider.Registry(hostname=self.host, insecure=target.insecure,
                                               tls_verify=target.ca or True, auth_backend=backend)
        if target.username:
            self.registry.auth.set_basic_auth(target.username, target.password)
        self.bytes_uploaded = 0
        self.backend = backend
        self._scoped_repo: str | None = None

    def _auth_backend(self) -> str:
        """Ping ``/v2/`` once with a short timeout (oras-py itself retries for minutes): a wrong URL, CA
        or password is reported at once, and the challenge picks oras-py's auth backend."""
        import requests

        verify: bool | str = self.target.ca or True
        try:
            r = requests.get(f"{self.target.url.rstrip('/')}/v2/", timeout=min(10.0, self.target.timeout_s),
                             verify=verify)
        except requests.exceptions.SSLError as exc:
            raise PublishError(f"TLS with {self.target.url} failed ({exc.__class__.__name__}): give the CA that "
                               "signed the registry's certificate with --registry-ca", code="tls") from None
        except requests.exceptions.RequestException as exc:
            raise PublishError(f"the registry {self.target.url} cannot be reached ({exc.__class__.__name__}); "
                               "check --registry", code="unreachable") from None
        challenge = r.headers.get("WWW-Authenticate", "")
        if r.status_code == 401 and not self.target.username:
            raise PublishError(f"{self.target.url} requires credentials: give --username and --password-env",
                               code="auth")
        if r.status_code == 401 and challenge.lower().startswith("basic"):
            check = requests.get(f"{self.target.url.rstrip('/')}/v2/", timeout=10.0, verify=verify,
                                 auth=(self.target.username, self.target.password))
            if check.status_code == 401:
                raise PublishError(f"{self.target.url} refused user {self.target.username!r}: check --username "
                                   "and the password in --password-env", code="auth")
        elif r.status_code not in (200, 401):
            raise PublishError(f"{self.target.url}/v2/ answered HTTP {r.status_code}: is this an OCI registry? "
                               "(check --registry)", code="unreachable")
        return "basic" if challenge.lower().startswith("basic") else "token"

    # -- primitives ------------------------------------------------------------------------------------
    def _scope(self, repo: str) -> None:
        """oras-py 0.2.43 caches ONE bearer token per client and re-sends it whatever scope a later 401
        asks for, so a token obtained for ``pull`` fails the ``push`` that follows (and another
        repository). Before working on a repository, drop the cached token and start with a push
        request, whose challenge asks for ``pull,push``: the next token covers everything here."""
        if self.backend != "token" or self._scoped_repo == repo:
            return
        self.registry.auth.token = None
        r = self.registry.do_request(self._url(repo, "blobs", "uploads/"), "POST",
                                     headers={"Content-Length": "0"})
        self._check(r, f"starting an upload to {repo}")
        location = r.headers.get("Location", "")
        if location:  # nothing is uploaded: cancel the session that only bought the token
            if location.startswith("/"):
                location = f"{'http' if self.target.insecure else 'https'}://{self.host}{location}"
            self.registry.do_request(location, "DELETE")
        self._scoped_repo = repo

    def _url(self, repo: str, kind: str, ref: str) -> str:
        return f"{'http' if self.target.insecure else 'https'}://{self.host}/v2/{repo}/{kind}/{ref}"

    def _check(self, response: Any, what: str) -> Any:
        if response.status_code in (401, 403):
            raise PublishError(f"{what}: access refused (HTTP {response.status_code}); check --username/"
                               "--password-env and the account's push rights", code="auth")
        if response.status_code not in (200, 201, 202):
            raise PublishError(f"{what}: HTTP {response.status_code} {response.text[:300]}", code="registry")
        return response

    def push_blob(self, repo: str, data: bytes, media_type: str) -> Descriptor:
        self._scope(repo)
        desc = Descriptor.of(media_type, data)
        container = self.registry.get_container(f"{self.host}/{repo}")
        layer = {"mediaType": media_type, "digest": desc.digest, "size": desc.size}
        if self.registry.blob_exists(layer, container):
            return desc
        with tempfile.NamedTemporaryFile(prefix="edge-fleet-blob-") as tmp:
            Path(tmp.name).write_bytes(data)
            self._check(self.registry.upload_blob(tmp.name, container, layer), f"upload of blob {desc.digest[:19]}…")
        self.bytes_uploaded += len(data)
        return desc

    def put_manifest(self, repo: str, ref: str, raw: bytes, media_type: str = MANIFEST) -> dict[str, str]:
        self._scope(repo)
        r = self._check(self.registry.do_request(self._url(repo, "manifests", ref), "PUT", data=raw,
                                                 headers={"Content-Type": media_type}),
                        f"PUT manifest {repo}:{ref}")
        claimed = r.headers.get("Docker-Content-Digest", "")
        if claimed and claimed != digest_of(raw):
            raise PublishError(f"the registry stored {repo}:{ref} as {claimed}, not {digest_of(raw)}", code="registry")
        return dict(r.headers)

    def get_manifest(self, repo: str, ref: str, accept: str = MANIFEST) -> bytes | None:
        self._scope(repo)
        r = self.registry.do_request(self._url(repo, "manifests", ref), "GET", headers={"Accept": accept})
        if r.status_code == 404:
            return None
        self._check(r, f"GET manifest {repo}:{ref}")
        if len(r.content) > MAX_MANIFEST_BYTES:
            raise PublishError(f"{repo}:{ref} is larger than a manifest can be", code="registry")
        return bytes(r.content)

    def blob_bytes(self, repo: str, digest: str, limit: int = 4 * 1024 * 1024) -> bytes:
        self._scope(repo)
        r = self._check(self.registry.get_blob(f"{self.host}/{repo}", digest), f"GET blob {digest[:19]}…")
        data = bytes(r.content[: limit + 1])
        if len(data) > limit or digest_of(data) != digest:
            raise PublishError(f"blob {digest[:19]}… read back from {repo} does not match its digest", code="registry")
        return data

    def referrers(self, repo: str, digest: str) -> Referrers:
        self._scope(repo)
        r = self.registry.do_request(self._url(repo, "referrers", digest), "GET", headers={"Accept": INDEX})
        if r.status_code == 200 and r.headers.get("Content-Type", "").split(";")[0] == INDEX:
            return Referrers("api", parse_index(r.content))
        raw = self.get_manifest(repo, tag_schema(digest), accept=INDEX)
        return Referrers("tag-schema", parse_index(raw) if raw is not None else None)

    # -- releases --------------------------------------------------------------------------------------
    def push_release(self, repo: str, tag: str, art: ReleaseArtifact) -> PushReport:
        """Blobs, the release manifest (by tag), the bundle referrer (by digest, plus the tag-schema index
        where the registry has no referrers API); then read everything back."""
        report = PushReport(repository=repo, tag=tag, digest=art.digest)
        for data, media_type in ((EMPTY_BYTES, EMPTY), (art.artifact, art.layer.media_type),
                                 (art.bundle, art.bundle_layer.media_type)):
            report.blobs.append(self.push_blob(repo, data, media_type).digest)
        self.put_manifest(repo, tag, art.manifest)
        existing = self.attached(repo, art)
        if existing is not None:  # this very bundle is attached already: publishing again adds nothing
            report.referrer, report.referrers_mode = existing
            report.bytes_uploaded = self.bytes_uploaded
            self.confirm_release(repo, tag, art, report)
            return report
        ref = art.referrer_descriptor
        headers = self.put_manifest(repo, ref.digest, art.referrer)
        report.referrer = ref.digest
        report.referrers_mode = choose_referrers_mode(headers, art.digest)
        if report.referrers_mode == "tag-schema":
            current = self.get_manifest(repo, tag_schema(art.digest), accept=INDEX)
            updated = add_referrer(parse_index(current) if current else None, ref)
            if updated is not None:
                self.put_manifest(repo, tag_schema(art.digest), updated, INDEX)
        report.bytes_uploaded = self.bytes_uploaded
        self.confirm_release(repo, tag, art, report)
        return report

    def attached(self, repo: str, art: ReleaseArtifact) -> tuple[str, str] | None:
        """(referrer digest, how found) of a referrer already carrying ``art.bundle`` (None: none)."""
        found = self.referrers(repo, art.digest)
        for d in (found.index.manifests if found.index else ())[:16]:
            if d.artifact_type not in BUNDLE_TYPES:
                continue
            raw = self.get_manifest(repo, d.digest)
            if raw is not None and any(b.digest == art.bundle_layer.digest for b in parse_manifest(raw).layers):
                return d.digest, found.mode
        return None

    def confirm_release(self, repo: str, tag: str, art: ReleaseArtifact, report: PushReport) -> None:
        """Read back what a gateway will read: the tag → our manifest, its layer, a referrer → our bundle."""
        raw = self.get_manifest(repo, tag)
        if raw is None or digest_of(raw) != art.digest:
            raise PublishError(f"{repo}:{tag} does not point at the manifest just pushed (got "
                               f"{digest_of(raw) if raw else 'nothing'}): another publisher raced, or the registry "
                               "dropped the write", code="not_confirmed")
        report.verified.append(f"tag {tag} → {art.digest}")
        if self.blob_bytes(repo, art.layer.digest, art.layer.size) != art.artifact:
            raise PublishError(f"the artifact read back from {repo} differs from the one pushed", code="not_confirmed")
        report.verified.append(f"layer {art.layer.digest} ({art.layer.size} bytes)")
        found = self.referrers(repo, art.digest)
        listed = [d for d in (found.index.manifests if found.index else ()) if d.artifact_type in BUNDLE_TYPES]
        if not any(d.digest == report.referrer for d in listed):
            raise PublishError(f"the signature referrer {report.referrer[:19]}… is not listed for {art.digest[:19]}… "
                               f"(looked via {found.mode}); gateways would not find the signature",
                               code="not_confirmed")
        referrer = parse_manifest(self.get_manifest(repo, report.referrer) or b"{}")
        if self.blob_bytes(repo, referrer.layers[0].digest) != art.bundle:
            raise PublishError("the bundle read back differs from the one pushed", code="not_confirmed")
        report.verified.append(f"signature referrer {report.referrer} via {found.mode}")

    # -- desired state ---------------------------------------------------------------------------------
    def current_desired(self, repo: str, tag: str) -> tuple[str, bytes] | None:
        """(manifest digest, bundle bytes) of the desired state now under ``tag`` (None: there is none)."""
        raw = self.get_manifest(repo, tag)
        if raw is None:
            return None
        try:
            manifest = parse_manifest(raw)
        except OciFormatError as exc:
            raise PublishError(f"{repo}:{tag} is not a desired-state manifest: {exc}", code="registry") from None
        layers = [d for d in manifest.layers if d.media_type in BUNDLE_TYPES]
        if len(layers) != 1:
            raise PublishError(f"{repo}:{tag} is not a desired-state manifest (no single bundle layer)",
                               code="registry")
        return digest_of(raw), self.blob_bytes(repo, layers[0].digest)

    def push_desired(self, repo: str, tag: str, manifest: bytes, bundle: bytes) -> PushReport:
        report = PushReport(repository=repo, tag=tag, digest=digest_of(manifest))
        for data, media_type in ((EMPTY_BYTES, EMPTY), (bundle, "application/vnd.dev.sigstore.bundle.v0.3+json")):
            report.blobs.append(self.push_blob(repo, data, media_type).digest)
        self.put_manifest(repo, tag, manifest)
        back = self.current_desired(repo, tag)
        if back is None or back[0] != report.digest or back[1] != bundle:
            raise PublishError(f"{repo}:{tag} does not hold the desired state just pushed: another publisher "
                               "raced, or the registry dropped the write", code="not_confirmed")
        report.verified.append(f"tag {tag} → {report.digest}")
        report.bytes_uploaded = self.bytes_uploaded
        return report
