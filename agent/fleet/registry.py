"""Releases from an OCI registry: desired state per scope, the MQTT doorbell, the gateway's pull.

Naming (documented in ``docs/registry.md``), under the configured repository prefix ``P``:

- a release of kind/name lives in repository ``P/<kind>/<name>``, tagged ``v<version>``;
- the desired state of a scope lives in ``P/desired-state``, tagged ``all``, ``site-<site>``,
  ``group-<group>`` or ``gw-<node-id>``;
- the doorbell is the MQTT topic ``{prefix}/desired/{scope}`` (e.g. ``edge/v1/desired/site/plant-a``)
  with a ~150-byte JSON payload naming the new desired-state manifest digest.

The doorbell is a hint, never authority: it only makes a gateway look earlier. A gateway pulls its
scopes' desired state when its fleet link connects, on a jittered timer, and a doorbell jittered
later; it verifies the signed document (trust store, scope, sequence), fetches the releases it does
not have yet (manifest by digest, the layer named by the signed desired state, resumable and
digest-checked) and hands each to the :class:`~agent.fleet.receiver.ReleaseReceiver` — the same
entry point as a retained MQTT release, so verify → floor → store → shadow → swap → watch →
rollback is one path. Offline it does nothing: what runs stays, and the next pull catches up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

from agent import jsonsafe
from agent.errors import AgentError
from agent.fleet.envelope import Envelope
from agent.fleet.receiver import Delivery, ReleaseReceiver
from agent.fleet.topics import Scope, TopicError
from agent.logs import get_logger
from agent.oci.client import RegistryClient, RegistryError, RegistryNotFound, prune_partials
from agent.oci.formats import (
    ANN_CREATED,
    BUNDLE_TYPES,
    OciFormatError,
    bundle_layers,
    check_repository,
    check_tag,
    parse_manifest,
    release_layer,
    tag_schema,
)
from agent.offload import run_blocking
from agent.storage.db import connect_reader
from agent.trust.bundle import BUNDLE_LIMITS, MAX_BUNDLE_BYTES, parse_bundle
from agent.trust.desired import DesiredRelease, DesiredState, verify_desired
from agent.trust.errors import ReleaseRejected
from agent.trust.releases import ReleaseStore
from agent.trust.statement import parse_statement
from agent.trust.truststore import TrustSet

log = get_logger("fleet")

DOORBELL_FORMAT = "edge-agent.doorbell/v1"
MAX_DOORBELL_BYTES = 1024
DOORBELL_LIMITS = jsonsafe.Limits(MAX_DOORBELL_BYTES, max_depth=4)
BUNDLE_CANDIDATES = 4  # signatures tried per release (newest first)


# ------------------------------------------------------------------------------------------- names

def scope_tag(scope: Scope) -> str:
    """The desired-state tag of a scope: ``all``, ``site-<s>``, ``group-<g>``, ``gw-<node>``."""
    tag = "all" if scope.kind == "all" else f"{scope.kind}-{scope.value}"
    try:
        return check_tag(tag, f"the registry tag of scope {scope}")
    except OciFormatError as exc:
        raise TopicError(f"{exc}: with a registry, site, group and node names may only use letters, digits, "
                         "'.', '_' and '-'") from None


def release_repository(prefix: str, kind: str, name: str) -> str:
    repo = f"{prefix.strip('/')}/{kind}/{name}" if prefix.strip("/") else f"{kind}/{name}"
    try:
        return check_repository(repo)
    except OciFormatError as exc:
        raise TopicError(f"{exc}: release names stored in a registry must be lower-case") from None


def desired_repository(prefix: str) -> str:
    return check_repository(f"{prefix.strip('/')}/desired-state" if prefix.strip("/") else "desired-state")


def doorbell_topic(topic_prefix: str, scope: Scope) -> str:
    return f"{topic_prefix}/desired/{scope}"


def doorbell_payload(scope: Scope, digest: str, sequence: int) -> bytes:
    return json.dumps({"format": DOORBELL_FORMAT, "scope": str(scope), "digest": digest, "sequence": sequence},
                      separators=(",", ":")).encode()


@dataclass(frozen=True)
class Doorbell:
    scope: Scope
    digest: str
    sequence: int


def parse_doorbell(topic_prefix: str, topic: str, payload: bytes) -> Doorbell | None:
    """A doorbell message, or None if it is not one (wrong topic, oversized, malformed: ignored)."""
    head = f"{topic_prefix}/desired/"
    if not topic.startswith(head) or not payload or len(payload) > MAX_DOORBELL_BYTES:
        return None
    try:
        scope = Scope.parse(topic[len(head):])
        obj = jsonsafe.loads(payload, DOORBELL_LIMITS)
    except (TopicError, jsonsafe.JsonRejected):
        return None
    if not isinstance(obj, dict) or obj.get("format") != DOORBELL_FORMAT or obj.get("scope") != str(scope):
        return None
    digest, seq = obj.get("digest"), obj.get("sequence", 0)
    if not isinstance(digest, str) or not digest.startswith("sha256:") or isinstance(seq, bool) \
            or not isinstance(seq, int):
        return None
    return Doorbell(scope, digest, seq)


# --------------------------------------------------------------------------------------- memory

@dataclass
class ScopeMemory:
    sequence: int = 0
    digest: str = ""


class PullLedger(Protocol):
    """What the puller remembers and checks against: the gateway's SQLite (:class:`StoreLedger`), or
    memory (:class:`MemoryLedger`: benchmarks with thousands of simulated gateways)."""

    async def scopes(self) -> dict[str, ScopeMemory]: ...
    async def remember(self, scope: str, state: DesiredState, digest: str) -> None: ...
    async def trust(self) -> TrustSet: ...
    async def floor(self, kind: str, name: str) -> int | None: ...
    async def record_error(self, code: str, message: str) -> None: ...


def load_scopes(db_path: Path) -> dict[str, ScopeMemory]:
    conn = connect_reader(db_path)
    try:
        rows = conn.execute("SELECT scope, sequence, digest FROM fleet_desired").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    return {str(s): ScopeMemory(int(q), str(d)) for s, q, d in rows}


def remember_job(scope: str, state: DesiredState, digest: str) -> Callable[[sqlite_utils.Database], None]:
    def job(db: sqlite_utils.Database) -> None:
        db.execute("INSERT INTO fleet_desired (scope, sequence, digest, signer_key_id, verified_at) "
                   "VALUES (?, ?, ?, ?, ?) ON CONFLICT(scope) DO UPDATE SET sequence = max(sequence, "
                   "excluded.sequence), digest = excluded.digest, signer_key_id = excluded.signer_key_id, "
                   "verified_at = excluded.verified_at",
                   (scope, state.sequence, digest, state.signer_key_id, time.time()))
    return job


class StoreLedger:
    """The gateway's ledger: ``fleet_desired`` and the trust store and floors of its ReleaseStore."""

    def __init__(self, releases: ReleaseStore) -> None:
        self.releases = releases

    async def scopes(self) -> dict[str, ScopeMemory]:
        return await run_blocking(load_scopes, self.releases.store.path)

    async def remember(self, scope: str, state: DesiredState, digest: str) -> None:
        await self.releases.store.writer.run(remember_job(scope, state, digest))

    async def trust(self) -> TrustSet:
        return await run_blocking(self.releases.trust_set)

    async def floor(self, kind: str, name: str) -> int | None:
        return await run_blocking(self.releases.floor, kind, name)

    async def record_error(self, code: str, message: str) -> None:
        await self.releases.store.record_error("fleet", code, message)


@dataclass
class MemoryLedger:
    """A ledger in memory (one per simulated gateway in the scale benchmark)."""

    trust_set: TrustSet
    floors: dict[tuple[str, str], int] = field(default_factory=dict)
    memory: dict[str, ScopeMemory] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)

    async def scopes(self) -> dict[str, ScopeMemory]:
        return dict(self.memory)

    async def remember(self, scope: str, state: DesiredState, digest: str) -> None:
        self.memory[scope] = ScopeMemory(state.sequence, digest)

    async def trust(self) -> TrustSet:
        return self.trust_set

    async def floor(self, kind: str, name: str) -> int | None:
        return self.floors.get((kind, name))

    async def record_error(self, code: str, message: str) -> None:
        self.errors.append((code, message))
        del self.errors[:-50]


# --------------------------------------------------------------------------------------- puller

@dataclass(frozen=True)
class PullSettings:
    repo_prefix: str = "edge"
    poll_s: float = 300.0
    poll_jitter: float = 0.2          # each period uniform in poll_s * [1 - j, 1 + j]
    doorbell_jitter_s: float = 5.0    # a doorbell is answered after uniform [0, this] seconds
    connect_jitter_s: float = 2.0
    max_bytes: int = 32 * 1024 * 1024


@dataclass
class PullCounters:
    polls: int = 0
    unchanged: int = 0
    desired_verified: int = 0
    desired_rejected: int = 0
    releases_fetched: int = 0
    releases_skipped: int = 0
    offered: int = 0
    failures: int = 0
    doorbells: int = 0
    doorbells_ignored: int = 0
    last_error: str = ""
    converged_at: dict[str, float] = field(default_factory=dict)


class RegistryPuller:
    """Keeps one gateway's releases in line with its scopes' desired state in the registry."""

    def __init__(self, *, node_id: str, scopes: list[Scope], client: RegistryClient, ledger: PullLedger,
                 receiver: ReleaseReceiver, settings: PullSettings, work_dir: Path,
                 rng: random.Random | None = None, on_state: Callable[[str, str], Any] | None = None) -> None:
        self.node_id = node_id
        self.scopes = list(scopes)
        self.tags = {str(s): scope_tag(s) for s in self.scopes}
        self.client = client
        self.ledger = ledger
        self.receiver = receiver
        self.settings = settings
        self.repo = desired_repository(settings.repo_prefix)
        self.work_dir = work_dir
        self.rng = rng or random.Random()
        self.on_state = on_state
        self.counters = PullCounters()
        self.memory: dict[str, ScopeMemory] = {}
        self._states: dict[str, DesiredState] = {}  # the last verified document per scope
        self._offered: set[tuple[str, str, int, str]] = set()
        self._tries: dict[tuple[str, str, int, str], int] = {}
        self._retry_at: dict[tuple[str, str, int, str], float] = {}
        self._next_prune = 0.0
        self._wake = asyncio.Event()
        self._pending: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._lock = asyncio.Lock()
        self.synced = asyncio.Event()  # set after every completed pull round (tests, benchmarks)

    # -- triggers ----------------------------------------------------------------------------------
    def kick(self, scopes: list[str] | None = None, delay: float = 0.0) -> None:
        """Pull ``scopes`` (all by default) after ``delay`` seconds (0: now)."""
        wanted = scopes or list(self.tags)
        if delay <= 0:
            self._pending.update(wanted)
            self._wake.set()
            return
        loop = asyncio.get_running_loop()
        for scope in wanted:
            if scope not in self._timers:
                self._timers[scope] = loop.call_later(delay, self._fire, scope)

    def _fire(self, scope: str) -> None:
        self._timers.pop(scope, None)
        self._pending.add(scope)
        self._wake.set()

    def on_connect(self) -> None:
        """The fleet link came up: look soon (jittered so a fleet reconnecting together spreads out)."""
        self.kick(delay=self.rng.uniform(0.0, self.settings.connect_jitter_s))

    def on_doorbell(self, bell: Doorbell) -> None:
        self.counters.doorbells += 1
        scope = str(bell.scope)
        known = self.memory.get(scope)
        if scope not in self.tags or (known is not None and known.digest == bell.digest):
            self.counters.doorbells_ignored += 1
            return
        self.kick([scope], delay=self.rng.uniform(0.0, self.settings.doorbell_jitter_s))

    # -- loop --------------------------------------------------------------------------------------
    def _period(self) -> float:
        j = self.settings.poll_jitter
        return self.settings.poll_s * self.rng.uniform(1.0 - j, 1.0 + j)

    async def run(self) -> None:
        self.memory = await self.ledger.scopes()
        self.kick()
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._period()):
                        await self._wake.wait()
                self._wake.clear()
                scopes = sorted(self._pending) or list(self.tags)
                self._pending.clear()
                await self.sync(scopes)
        finally:
            for handle in self._timers.values():
                handle.cancel()
            self._timers.clear()

    async def sync(self, scopes: list[str] | None = None) -> None:
        """One pull round; never raises (a failure is logged, counted and retried next round)."""
        async with self._lock:
            self.counters.polls += 1
            for scope in scopes or list(self.tags):
                try:
                    await self._sync_scope(scope)
                except (RegistryError, OciFormatError) as exc:
                    self.counters.failures += 1
                    self.counters.last_error = str(exc)
                    log.warning("fleet_registry_pull_failed", scope=scope, code=exc.code, error=str(exc)[:500])
                    await self._state("down", str(exc)[:200])
                except ReleaseRejected as exc:
                    self.counters.desired_rejected += 1
                    log.warning("fleet_desired_state_rejected", scope=scope, code=exc.code, error=str(exc))
                    with contextlib.suppress(AgentError):
                        await self.ledger.record_error(exc.code, f"desired state for {scope} refused: {exc}")
                except Exception as exc:  # a bug must not stop the puller: next round tries again
                    self.counters.failures += 1
                    log.error("fleet_registry_pull_error", scope=scope, error=repr(exc))
            if time.monotonic() >= self._next_prune:  # leftovers of abandoned downloads, once an hour
                self._next_prune = time.monotonic() + 3600.0
                with contextlib.suppress(AgentError, OSError):
                    await run_blocking(prune_partials, self.work_dir, set())
            self.synced.set()

    async def _state(self, state: str, detail: str) -> None:
        if self.on_state is not None:
            with contextlib.suppress(Exception):
                result = self.on_state(state, detail)
                if asyncio.iscoroutine(result):
                    await result

    async def _sync_scope(self, scope: str) -> None:
        tag = self.tags[scope]
        known = self.memory.get(scope, ScopeMemory())
        try:
            got = await self.client.manifest_bytes(self.repo, tag, if_none_match=known.digest)
        except RegistryNotFound:  # most scopes have no desired state of their own: nothing to do
            await self._state("up", self.client.cfg.url)
            log.debug("fleet_desired_state_none", scope=scope, tag=tag)
            return
        await self._state("up", self.client.cfg.url)
        if got is None:
            self.counters.unchanged += 1
            await self._fetch_missing(scope)
            return
        raw, digest = got
        manifest = parse_manifest(raw)
        layers = bundle_layers(manifest)
        if len(layers) != 1:
            raise OciFormatError(f"{self.repo}:{tag} is not a desired-state artifact (it has {len(layers)} "
                                 "signature layers, not 1)")
        bundle = await self.client.blob(self.repo, layers[0].digest, limit=MAX_BUNDLE_BYTES)
        trust = await self.ledger.trust()
        state = verify_desired(bundle, trust, scope=scope, min_sequence=known.sequence or None)  # ~1 ms, no I/O
        await self.ledger.remember(scope, state, digest)
        self.memory[scope] = ScopeMemory(max(known.sequence, state.sequence), digest)
        self._states[scope] = state
        self.counters.desired_verified += 1
        log.info("fleet_desired_state_verified", scope=scope, sequence=state.sequence, digest=digest,
                 releases=[f"{r.kind}/{r.name}@{r.version}" for r in state.releases])
        await self._fetch_missing(scope)

    async def _fetch_missing(self, scope: str) -> None:
        state = self._states.get(scope)
        if state is None:
            return
        for entry in state.releases:
            await self._fetch(entry, scope)

    async def _have(self, entry: DesiredRelease) -> bool:
        """Already installed, handled, or handed over and still being worked on (a connect pull right
        after the start-up pull must not download the same release twice)."""
        ident = (entry.kind, entry.name, entry.version, entry.sha256)
        if ident in self.receiver.seen:
            return True
        if ident in self._offered and self.receiver.in_flight(entry.kind, entry.name):
            return True
        if time.monotonic() < self._retry_at.get(ident, 0.0):
            return True  # refused or failed before: not again until its backoff has passed
        floor = await self.ledger.floor(entry.kind, entry.name)
        return floor is not None and entry.version <= floor

    @staticmethod
    def _about(bundle: bytes, entry: DesiredRelease) -> bool:
        """The bundle's (unverified) statement is about these bytes and this version."""
        statement = parse_statement(parse_bundle(bundle).envelope.payload)
        predicate = statement.predicate if isinstance(statement.predicate, dict) else {}
        return statement.subject_sha256 == entry.sha256 and predicate.get("version") == entry.version

    def _back_off(self, ident: tuple[str, str, int, str], *, transient: bool = False) -> None:
        """Wait before the next try of a release. Refused by the gateway: one poll period, doubling up
        to a day (a permanently bad release is not downloaded every poll; one the gateway can take
        later — a key added, the clock fixed — is still taken). A failed fetch (timeout, registry
        busy): 5–30 s, jittered and doubling up to the poll period, so an overloaded registry is
        retried soon but not in step by the whole fleet."""
        tries = self._tries.get(ident, 0) + 1
        self._tries[ident] = tries
        if transient:
            wait = min(self.rng.uniform(5.0, 30.0) * 2 ** (tries - 1), self.settings.poll_s)
            self.kick(delay=wait + 0.5)
        else:
            wait = min(self.settings.poll_s * 2 ** (tries - 1), 86400.0)
        self._retry_at[ident] = time.monotonic() + wait

    async def _fetch(self, entry: DesiredRelease, scope: str) -> None:
        ident = (entry.kind, entry.name, entry.version, entry.sha256)
        if ident in self._offered and ident not in self.receiver.seen \
                and not self.receiver.in_flight(entry.kind, entry.name) and ident not in self._retry_at:
            self._back_off(ident)  # handed over last time and not taken: the receiver refused it
        if await self._have(entry):
            self.counters.releases_skipped += 1
            return
        try:
            await self._fetch_now(entry, scope)
        except RegistryError:
            self._back_off(ident, transient=True)
            raise
        except OciFormatError:
            self._back_off(ident)
            raise

    async def _fetch_now(self, entry: DesiredRelease, scope: str) -> None:
        manifest = await self.client.manifest(entry.repository, entry.digest)
        layer = release_layer(manifest, entry.sha256)
        artifact = await self.client.download(entry.repository, layer.digest, layer.size, self.work_dir,
                                              limit=self.settings.max_bytes)
        bundle = await self._bundle(entry, manifest)
        self.counters.releases_fetched += 1
        env = Envelope(kind=entry.kind, name=entry.name, version=entry.version, sha256=entry.sha256,
                       artifact=artifact, bundle=bundle)
        log.info("fleet_registry_release_fetched", scope=scope, kind=entry.kind, release=entry.name,
                 version=entry.version, bytes=len(artifact))
        self.receiver.offer(Delivery(env, Scope.parse(scope)))
        ident = (entry.kind, entry.name, entry.version, entry.sha256)
        self._offered.add(ident)
        self._retry_at.pop(ident, None)  # judged by the receiver now; a refusal starts the next backoff
        self.counters.offered += 1

    async def _bundle(self, entry: DesiredRelease, manifest: Any) -> dict[str, Any]:
        """The first candidate signature that is about these bytes and this version (read, not trusted:
        the receiver's verification decides): the one the signed desired state names (one request),
        else bundled layers, then the referrers (API or tag schema)."""
        if entry.bundle:
            try:
                data = await self.client.blob(entry.repository, entry.bundle, limit=MAX_BUNDLE_BYTES)
                if self._about(data, entry):
                    obj = jsonsafe.loads(data, BUNDLE_LIMITS)  # parsed strictly just above: cannot fail
                    assert isinstance(obj, dict)
                    return obj
            except (RegistryError, ReleaseRejected) as exc:
                log.info("fleet_registry_named_bundle_unusable", release=entry.name, error=str(exc)[:200])
        candidates = list(bundle_layers(manifest))
        index, _how = await self.client.referrers(entry.repository, entry.digest)
        refs = sorted((d for d in (index.manifests if index else ()) if d.artifact_type in BUNDLE_TYPES),
                      key=lambda d: d.annotations.get(ANN_CREATED, ""), reverse=True)
        problems: list[str] = []
        for ref in refs[:BUNDLE_CANDIDATES]:
            try:
                candidates.extend(bundle_layers(await self.client.manifest(entry.repository, ref.digest)))
            except (RegistryError, OciFormatError) as exc:
                problems.append(str(exc))
        for desc in candidates[:BUNDLE_CANDIDATES + 1]:
            try:
                data = await self.client.blob(entry.repository, desc.digest, limit=MAX_BUNDLE_BYTES)
                about = self._about(data, entry)
            except (RegistryError, ReleaseRejected) as exc:
                problems.append(str(exc))
                continue
            if about:
                obj = jsonsafe.loads(data, BUNDLE_LIMITS)  # parsed strictly just above: cannot fail
                assert isinstance(obj, dict)
                return obj
        raise RegistryError(f"{entry.repository}@{entry.digest[:19]}… has no signature for {entry.kind} "
                            f"{entry.name} v{entry.version} (looked at {len(candidates)} bundle(s), referrers via "
                            f"{_how}, tag {tag_schema(entry.digest)}){': ' + problems[0] if problems else ''}",
                            code="registry_unsigned")
