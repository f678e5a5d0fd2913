"""The release receiver: from raw fleet messages to at most one release in work per kind/name.

What arrives is untrusted and unordered: retained copies on every re-subscribe, session-queued
copies after an outage, releases for other scopes, garbage. The receiver
- ignores releases addressed to another gateway/site/group, and empty (cleared) retained messages
  — clearing a topic never uninstalls anything;
- rejects malformed envelopes with a specific code and reports it;
- recognises a delivery it has already handled (kind, name, version, sha256) and drops it;
- drops, without reporting, a release older than what the gateway already has (``superseded``):
  an offline gateway coming back gets only the newest, never an older one;
- ignores releases whose signed ``targets`` exclude this gateway (before they can compete below);
- coalesces a flood: while one release of a kind/name is being installed, only the newest few of the
  ones that arrived meanwhile wait (``SLOT_DEPTH``), newest first; once one is installed, the older
  waiting ones are dropped; if the newest is rejected, the next-newest gets its turn — so a bad or
  forged "version 999" cannot make a gateway skip the good release published with it.
"""

from __future__ import annotations

import asyncio
import fnmatch
from dataclasses import dataclass
from typing import Protocol

from agent.fleet.envelope import Envelope, EnvelopeError, decode, signed_targets
from agent.fleet.reporter import ReleaseStatus, StatusReporter, record_local_job
from agent.fleet.topics import Scope, TopicError, Topics, addresses
from agent.logs import get_logger
from agent.offload import run_blocking

log = get_logger("fleet")

INLINE_DECODE_BYTES = 64 * 1024  # smaller envelopes are decoded on the loop (cheaper than a thread hop)
SLOT_DEPTH = 3  # deliveries kept waiting per kind/name: the newest, plus fallbacks if it is rejected


@dataclass(frozen=True)
class Delivery:
    envelope: Envelope
    scope: Scope


class ReleaseHandler(Protocol):
    """What installs a verified release (the swap orchestrator)."""

    async def current_version(self, kind: str, name: str) -> int:
        """The persisted version floor of kind/name (0 if none): anything <= it is old news."""
        ...

    async def running_version(self, kind: str, name: str) -> int | None:
        """The version running now (for reports; may be below the floor after a rollback)."""
        ...

    async def handle(self, delivery: Delivery) -> str:
        """Verify, install and report one release; return the outcome ("active", "rejected", …).
        Never raises for a bad release."""
        ...


@dataclass
class ReceiverCounters:
    messages: int = 0
    not_for_us: int = 0
    cleared: int = 0
    malformed: int = 0
    duplicates: int = 0
    superseded: int = 0
    coalesced: int = 0
    handled: int = 0


class ReleaseReceiver:
    def __init__(self, *, node_id: str, site: str, groups: tuple[str, ...] | list[str], topics: Topics,
                 max_bytes: int, handler: ReleaseHandler, reporter: StatusReporter,
                 seen: set[tuple[str, str, int, str]] | None = None) -> None:
        self.node_id = node_id
        self.site = site
        self.groups = tuple(groups)
        self.topics = topics
        self.max_bytes = max_bytes
        self.handler = handler
        self.reporter = reporter
        self.seen: set[tuple[str, str, int, str]] = seen if seen is not None else set()
        self.counters = ReceiverCounters()
        self._slots: dict[tuple[str, str], list[Delivery]] = {}
        self._hold_until = 0.0
        self._workers: dict[tuple[str, str], asyncio.Task[None]] = {}

    def settle(self, seconds: float) -> None:
        """Hold installs for ``seconds`` (called on every connect): the retained releases and the
        session's queued copies arrive as one burst, and only the newest of it gets installed —
        a gateway back from an outage goes straight to the newest version."""
        self._hold_until = max(self._hold_until, asyncio.get_running_loop().time() + seconds)

    def filters(self) -> list[str]:
        return self.topics.release_filters(self.node_id, self.site, self.groups)

    async def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        self.counters.messages += 1
        try:
            where = self.topics.parse_release(topic)
        except TopicError as exc:
            log.warning("fleet_message_ignored", topic=topic, reason=str(exc))
            return
        if not addresses(where.scope, self.node_id, self.site, self.groups):
            self.counters.not_for_us += 1
            log.info("fleet_release_not_for_us", topic=topic, scope=str(where.scope))
            return
        if not payload:
            self.counters.cleared += 1
            log.info("fleet_release_cleared", topic=topic, note="a cleared release topic uninstalls nothing")
            return
        try:
            if len(payload) <= INLINE_DECODE_BYTES:
                env = decode(payload, max_bytes=self.max_bytes, kind=where.kind, name=where.name)
            else:
                env = await run_blocking(decode, payload, max_bytes=self.max_bytes, kind=where.kind, name=where.name)
        except EnvelopeError as exc:
            self.counters.malformed += 1
            log.warning("fleet_release_malformed", topic=topic, code=exc.code, error=str(exc))
            await self.reporter.report(ReleaseStatus(
                node_id=self.node_id, kind=where.kind, name=where.name, version=None, state="rejected",
                scope=str(where.scope), code=exc.code, message=str(exc),
                active_version=await self._running(where.kind, where.name)))
            return
        self.offer(Delivery(env, where.scope))

    async def _running(self, kind: str, name: str) -> int | None:
        try:
            return await self.handler.running_version(kind, name)
        except Exception:  # only used for the report
            return None

    def offer(self, delivery: Delivery) -> None:
        env = delivery.envelope
        key = (env.kind, env.name)
        ident = (env.kind, env.name, env.version, env.sha256)
        if ident in self.seen:
            self.counters.duplicates += 1
            log.debug("fleet_release_duplicate", kind=env.kind, release=env.name, version=env.version)
            return
        targets = signed_targets(env.bundle)
        if targets and not any(fnmatch.fnmatchcase(self.node_id, t) for t in targets):
            # signed for other gateways: must not even compete with ours in the coalescing below
            self.counters.not_for_us += 1
            log.info("fleet_release_not_targeted", kind=env.kind, release=env.name, version=env.version,
                     targets=list(targets))
            return
        waiting = self._slots.setdefault(key, [])
        if any((d.envelope.version, d.envelope.sha256) == (env.version, env.sha256) for d in waiting):
            self.counters.duplicates += 1
            return
        waiting.append(delivery)
        waiting.sort(key=lambda d: d.envelope.version, reverse=True)
        while len(waiting) > SLOT_DEPTH:  # bounded: keep the newest few (fallbacks if the newest is bad)
            waiting.pop()
            self.counters.coalesced += 1
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.create_task(self._work(key), name=f"fleet-release-{env.kind}-{env.name}")

    def _take(self, key: tuple[str, str]) -> Delivery | None:
        waiting = self._slots.get(key)
        if not waiting:
            self._slots.pop(key, None)
            return None
        delivery = waiting.pop(0)
        if not waiting:
            del self._slots[key]
        return delivery

    def _drop_not_newer(self, key: tuple[str, str], version: int) -> None:
        """After ``version`` was installed, waiting deliveries that are not newer are obsolete."""
        waiting = self._slots.get(key, [])
        keep = [d for d in waiting if d.envelope.version > version]
        self.counters.coalesced += len(waiting) - len(keep)
        if keep:
            self._slots[key] = keep
        else:
            self._slots.pop(key, None)

    async def _work(self, key: tuple[str, str]) -> None:
        delay = self._hold_until - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        while True:
            delivery = self._take(key)
            if delivery is None:
                return
            env = delivery.envelope
            ident = (env.kind, env.name, env.version, env.sha256)
            if ident in self.seen:
                self.counters.duplicates += 1
                continue
            try:
                floor = await self.handler.current_version(env.kind, env.name)
                if env.version < floor:
                    self.seen.add(ident)
                    self.counters.superseded += 1
                    log.info("fleet_release_superseded", kind=env.kind, release=env.name, version=env.version,
                             current=floor)
                    await self.reporter.writer.run(record_local_job(
                        env.kind, env.name, env.version, env.sha256, scope=str(delivery.scope), state="superseded",
                        message=f"older than version {floor} already installed"))
                    continue
                self.seen.add(ident)
                outcome = await self.handler.handle(delivery)
                self.counters.handled += 1
                if outcome == "rejected":
                    # may be accepted later (key added, clock fixed): retried on the next delivery,
                    # which for a retained release means the next (re)connect — bounded, not a loop.
                    # Meanwhile the next-newest waiting delivery (if any) gets its turn.
                    self.seen.discard(ident)
                elif outcome != "ignored":
                    self._drop_not_newer(key, env.version)
            except Exception as exc:  # a bug or a storage failure: log, keep the worker alive
                self.seen.discard(ident)
                log.error("fleet_release_failed", kind=env.kind, release=env.name, version=env.version,
                          error=repr(exc))

    def has_pending(self, kind: str, name: str) -> bool:
        """A newer release of kind/name is waiting (the health window may end early for it)."""
        return (kind, name) in self._slots

    def in_flight(self, kind: str, name: str) -> bool:
        """A release of kind/name is waiting or being handled right now."""
        worker = self._workers.get((kind, name))
        return (kind, name) in self._slots or (worker is not None and not worker.done())

    def busy(self) -> bool:
        return bool(self._slots) or any(not t.done() for t in self._workers.values())

    async def drain(self) -> None:
        """Wait until every queued release has been handled (tests, benchmarks, shutdown)."""
        while self.busy():
            await asyncio.gather(*[t for t in self._workers.values() if not t.done()], return_exceptions=True)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
