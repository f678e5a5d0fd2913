"""The gateway's registry client: reads manifests and blobs over the OCI distribution API, asyncio-native.

Why not oras-py here (measurements in ``docs/registry.md``): its transport blocks (``requests``) and
retries a failing request for about two minutes with sleeps, it restarts an interrupted download
from byte 0, it does not check a blob against its digest, and it has no referrers API. A gateway
on a factory link needs the opposite, so this client keeps to the few calls a pull needs, on
``httpx``'s async transport:

- **digest-verified**: every manifest fetched by digest and every blob is hashed while it arrives;
  a mismatch is an error and the bytes are discarded (a mirror or a proxy is never trusted);
- **resumable**: a blob download writes ``<hex>.partial`` and continues from its length with a
  ``Range`` request after a cut (a registry that ignores ``Range`` answers 200: start again);
- **auth** per the distribution spec: ``Basic`` with the configured user, or the ``Bearer`` token
  flow (``WWW-Authenticate: Bearer realm=…,service=…,scope=…`` → token endpoint, with the user's
  credentials or anonymously), or a static bearer token; tokens are cached per scope;
- **TLS** with a private CA (``ca`` PEM file) or the system store; TLS 1.2 minimum;
- **mirror / pull-through cache**: endpoints are tried in order (mirror first, then the registry);
  a failing, incomplete or lying mirror costs one request, never correctness;
- **bounded**: blob downloads share a semaphore (the gateway's pull concurrency), every request has
  a timeout, and nothing is retried in a loop here (the caller's timer is the retry).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import re
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from agent.errors import AgentError
from agent.oci.formats import (
    INDEX,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    Index,
    Manifest,
    OciFormatError,
    check_digest,
    digest_of,
    parse_index,
    parse_manifest,
    tag_schema,
)
from agent.offload import run_blocking

ACCEPT_MANIFEST = f"{MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"
FLUSH_BYTES = 4 * 1024 * 1024


class RegistryError(AgentError):
    """A registry could not give what was asked (unreachable, refused, not found, lied)."""

    code = "registry_error"


class RegistryUnavailable(RegistryError):
    code = "registry_unreachable"


class RegistryAuthError(RegistryError):
    code = "registry_auth"


class RegistryNotFound(RegistryError):
    code = "registry_not_found"


class RegistryDigestMismatch(RegistryError):
    code = "registry_digest_mismatch"


@dataclass(frozen=True)
class RegistryConfig:
    """Where and how to reach one registry (and its optional mirror)."""

    url: str                      # https://host[:port] (http:// only for loopback tests and labs)
    mirror: str = ""              # https://cache.site[:port]: a mirror or pull-through cache, tried first
    username: str = ""
    password: str = ""
    token: str = ""               # a static bearer token (instead of user/password)
    ca: str = ""                  # PEM file of a private CA; empty = the system trust store
    timeout_s: float = 30.0

    def endpoints(self) -> list[str]:
        out = [self.mirror.rstrip("/")] if self.mirror else []
        return [*out, self.url.rstrip("/")]

    def __repr__(self) -> str:  # never show secrets
        return f"RegistryConfig(url={self.url!r}, mirror={self.mirror!r}, username={self.username!r})"


def check_url(url: str, what: str = "registry URL") -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise RegistryError(f"{what} {url!r} must look like https://host[:port] (no path)", code="config_invalid")
    return url


@dataclass
class ClientStats:
    requests: int = 0
    bytes_in: int = 0
    resumed: int = 0
    by_endpoint: dict[str, int] = field(default_factory=dict)


@functools.lru_cache(maxsize=8)
def tls_context(ca: str) -> ssl.SSLContext:
    """One context per CA file, shared by every client (loading a trust store costs ~1 MB and ms)."""
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise RegistryError(f"the registry CA file {ca!r} cannot be loaded: {exc}", code="config_invalid") from exc
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_CHALLENGE.findall(rest))


class RegistryClient:
    """One registry (plus mirror), shared by every pull of a gateway."""

    def __init__(self, cfg: RegistryConfig, *, downloads: asyncio.Semaphore | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        for url in cfg.endpoints():
            check_url(url)
        self.cfg = cfg
        self.stats = ClientStats()
        self._downloads = downloads or asyncio.Semaphore(2)
        self._tokens: dict[tuple[str, str], str] = {}
        # whether the registry has the referrers API (None: not asked yet); a 404 once is remembered
        self.referrers_api: bool | None = None
        self._http = httpx.AsyncClient(
            verify=tls_context(cfg.ca), timeout=httpx.Timeout(cfg.timeout_s, connect=min(10.0, cfg.timeout_s)),
            follow_redirects=True, trust_env=False, transport=transport,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=2))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------------------------
    def _basic(self) -> str:
        return "Basic " + base64.b64encode(f"{self.cfg.username}:{self.cfg.password}".encode()).decode()

    async def _token(self, endpoint: str, challenge: dict[str, str]) -> str:
        realm = challenge.get("realm", "")
        if not realm.startswith(("http://", "https://")):
            raise RegistryAuthError(f"{endpoint} asked for a bearer token without a usable realm ({realm!r})")
        key = (realm, challenge.get("scope", ""))
        if key in self._tokens:
            return self._tokens[key]
        params = {k: v for k, v in challenge.items() if k in ("service", "scope")}
        headers = {"Authorization": self._basic()} if self.cfg.username else {}
        try:
            r = await self._http.get(realm, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"the token service {realm} cannot be reached: {exc!r}") from exc
        self.stats.requests += 1
        if r.status_code != 200:
            raise RegistryAuthError(f"the token service {realm} refused the credentials (HTTP {r.status_code}); "
                                    "check fleet.registry_username / fleet.registry_password")
        try:
            body = r.json()
            token = str(body.get("token") or body.get("access_token") or "")
        except ValueError:
            token = ""
        if not token:
            raise RegistryAuthError(f"the token service {realm} answered without a token")
        self._tokens[key] = token
        return token

    async def _authorize(self, endpoint: str, response: httpx.Response, headers: dict[str, str]) -> bool:
        """Add credentials for a 401; False if there is nothing (more) to try."""
        if "Authorization" in headers:
            return False
        scheme, params = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if self.cfg.token and scheme == "bearer":
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        elif scheme == "bearer":
            headers["Authorization"] = f"Bearer {await self._token(endpoint, params)}"
        elif scheme == "basic" and self.cfg.username:
            headers["Authorization"] = self._basic()
        else:
            return False
        return True

    @contextlib.asynccontextmanager
    async def _request(self, path: str, headers: dict[str, str] | None = None, *,
                       ok: tuple[int, ...] = (200,)) -> AsyncIterator[httpx.Response]:
        """GET ``path`` on the first endpoint that answers with a status in ``ok`` (streamed response)."""
        problems: list[str] = []
        last = "net"
        for endpoint in self.cfg.endpoints():
            hdrs = dict(headers or {})
            try:
                while True:
                    req = self._http.build_request("GET", endpoint + path, headers=hdrs)
                    response = await self._http.send(req, stream=True)
                    self.stats.requests += 1
                    self.stats.by_endpoint[endpoint] = self.stats.by_endpoint.get(endpoint, 0) + 1
                    if response.status_code == 401 and await self._authorize(endpoint, response, hdrs):
                        await response.aclose()
                        continue
                    break
            except httpx.HTTPError as exc:
                problems.append(f"{endpoint}: {type(exc).__name__}: {exc}".rstrip(": "))
                last = "net"
                continue
            if response.status_code in ok:
                try:
                    yield response
                finally:
                    await response.aclose()
                return
            await response.aclose()
            status = response.status_code
            if status == 404:
                last = "notfound"
                problems.append(f"{endpoint}: not found")
            elif status in (401, 403):
                last = "auth"
                problems.append(f"{endpoint}: HTTP {status}, access refused (check fleet.registry_username/"
                                "registry_password or registry_token)")
            else:
                last = "http"
                problems.append(f"{endpoint}: HTTP {status}")
        # the registry itself (the last endpoint) decides what kind of failure this is
        text = "; ".join(problems)
        if last == "notfound":
            raise RegistryNotFound(f"{path} not found ({text})")
        if last == "auth":
            raise RegistryAuthError(f"{path}: {text}")
        raise RegistryUnavailable(f"{path}: {text}")

    async def _read(self, response: httpx.Response, limit: int, what: str) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RegistryError(f"{what} is {declared} bytes, over the limit of {limit}", code="registry_too_large")
        buf = bytearray()
        async for chunk in response.aiter_bytes():
            buf += chunk
            if len(buf) > limit:
                raise RegistryError(f"{what} exceeds the limit of {limit} bytes", code="registry_too_large")
        self.stats.bytes_in += len(buf)
        return bytes(buf)

    # -- manifests ---------------------------------------------------------------------------------
    async def manifest_bytes(self, repo: str, reference: str, *, accept: str = ACCEPT_MANIFEST,
                             if_none_match: str = "") -> tuple[bytes, str] | None:
        """(bytes, digest) of a manifest or index by tag or digest; None if ``if_none_match`` still holds.

        By digest, the bytes must hash to it; by tag, to the ``Docker-Content-Digest`` the registry
        names (when it names one)."""
        headers = {"Accept": accept}
        if if_none_match:
            headers["If-None-Match"] = f'"{if_none_match}"'
        async with self._request(f"/v2/{repo}/manifests/{reference}", headers, ok=(200, 304)) as r:
            if r.status_code == 304:
                return None
            raw = await self._read(r, MAX_MANIFEST_BYTES, f"manifest {repo}:{reference}")
            claimed = r.headers.get("Docker-Content-Digest", "")
        digest = digest_of(raw)
        expected = reference if reference.startswith("sha256:") else claimed
        if expected and expected != digest:
            raise RegistryDigestMismatch(f"manifest {repo}@{reference} has digest {digest}, not {expected}: "
                                         "corrupted or altered in transit (or by a mirror)")
        if if_none_match and digest == if_none_match:
            return None
        return raw, digest

    async def manifest(self, repo: str, reference: str) -> Manifest:
        got = await self.manifest_bytes(repo, reference)
        assert got is not None
        return parse_manifest(got[0])

    async def referrers(self, repo: str, digest: str, artifact_type: str = "") -> tuple[Index | None, str]:
        """The referrers of ``digest`` and how they were found: ``("api")`` (registry's referrers API),
        ``("tag-schema")`` (the ``sha256-<hex>`` index) — (None, "none") if there are none."""
        check_digest(digest, "subject digest")
        query = f"?artifactType={artifact_type}" if artifact_type else ""
        if self.referrers_api is not False:
            try:
                async with self._request(f"/v2/{repo}/referrers/{digest}{query}", {"Accept": INDEX}) as r:
                    raw = await self._read(r, MAX_MANIFEST_BYTES, f"referrers of {digest}")
                    is_index = r.headers.get("Content-Type", "").split(";")[0].strip() == INDEX
                if is_index:
                    self.referrers_api = True
                    return parse_index(raw), "api"
            except RegistryNotFound:
                # 404: no referrers API here (distribution 2.8): the tag schema, now and from now on
                self.referrers_api = False
            except OciFormatError:
                pass
        try:
            got = await self.manifest_bytes(repo, tag_schema(digest), accept=INDEX)
        except RegistryNotFound:
            return None, "none"
        assert got is not None
        return parse_index(got[0]), "tag-schema"

    # -- blobs -------------------------------------------------------------------------------------
    async def blob(self, repo: str, digest: str, *, limit: int) -> bytes:
        """A small blob (bundle, desired state) in memory, checked against its digest."""
        check_digest(digest, "blob digest")
        async with self._downloads, self._request(f"/v2/{repo}/blobs/{digest}") as r:
            data = await self._read(r, limit, f"blob {digest[:19]}…")
        if digest_of(data) != digest:
            raise RegistryDigestMismatch(f"blob {digest[:19]}… from {repo} does not match its digest: corrupted "
                                         "or altered in transit (or by a mirror)")
        return data

    async def download(self, repo: str, digest: str, size: int, directory: Path, *, limit: int) -> bytes:
        """A release blob, resumable: ``directory/<hex>.partial`` keeps what arrived (flushed every
        :data:`FLUSH_BYTES` and when a transfer breaks), and the next call continues with
        ``Range: bytes=<have>-``. Returns the complete, verified bytes; the partial file is removed."""
        check_digest(digest, "blob digest")
        if size > limit:
            raise RegistryError(f"blob {digest[:19]}… is {size} bytes, over the limit of {limit} "
                                "(fleet.max_release_bytes)", code="registry_too_large")
        part = directory / f"{digest.split(':', 1)[1]}.partial"
        async with self._downloads:
            buf = bytearray(await run_blocking(_read_partial, part, size))
            hasher = hashlib.sha256(buf)
            flushed = len(buf)
            if len(buf) < size:
                if buf:
                    self.stats.resumed += 1
                try:
                    headers = {"Range": f"bytes={len(buf)}-"} if buf else {}
                    async with self._request(f"/v2/{repo}/blobs/{digest}", headers, ok=(200, 206)) as r:
                        if r.status_code == 200 and buf:  # the server ignored Range: start again
                            buf.clear()
                            hasher, flushed = hashlib.sha256(), 0
                            await run_blocking(part.unlink, missing_ok=True)
                        elif r.status_code == 206 and not r.headers.get("Content-Range", "").startswith(
                                f"bytes {len(buf)}-"):
                            raise RegistryError(f"blob {digest[:19]}…: the registry answered a range request with "
                                                f"{r.headers.get('Content-Range')!r}", code="registry_bad_response")
                        async for chunk in r.aiter_bytes():
                            if len(buf) + len(chunk) > size:
                                buf.clear()
                                flushed = 0
                                await run_blocking(part.unlink, missing_ok=True)
                                raise RegistryDigestMismatch(f"blob {digest[:19]}… is longer than its {size} bytes")
                            buf += chunk
                            hasher.update(chunk)
                            self.stats.bytes_in += len(chunk)
                            if len(buf) - flushed >= FLUSH_BYTES:
                                await run_blocking(_append, part, bytes(buf[flushed:]))
                                flushed = len(buf)
                finally:
                    if flushed < len(buf) < size:  # keep what arrived for the next attempt
                        await run_blocking(_append, part, bytes(buf[flushed:]))
            if "sha256:" + hasher.hexdigest() != digest or len(buf) != size:
                await run_blocking(part.unlink, missing_ok=True)
                raise RegistryDigestMismatch(f"blob {digest[:19]}… from {repo} does not match its digest "
                                             f"({len(buf)} of {size} bytes): discarded, it will be fetched again")
            await run_blocking(part.unlink, missing_ok=True)
        return bytes(buf)


def _read_partial(part: Path, size: int) -> bytes:
    """What an interrupted download left (nothing if it is longer than the blob can be)."""
    part.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = part.read_bytes()
    except FileNotFoundError:
        return b""
    return data if len(data) < size else b""


def _append(part: Path, data: bytes) -> None:
    """No fsync: a partial file that lost its tail in a power cut is shorter (fetched again) or wrong
    (the digest finds it and it is discarded); syncing every chunk would only slow the pull."""
    with part.open("ab") as out:
        out.write(data)


def prune_partials(directory: Path, keep: set[str], max_age_s: float = 7 * 86400) -> int:
    """Remove partial downloads no longer wanted (not in ``keep``, older than ``max_age_s``)."""
    removed = 0
    if not directory.is_dir():
        return 0
    now = time.time()
    for p in directory.glob("*.partial"):
        if p.stem not in keep and now - p.stat().st_mtime > max_age_s:
            p.unlink(missing_ok=True)
            removed += 1
    return removed
