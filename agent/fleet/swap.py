"""The swap orchestrator: verify → prepare → shadow → switch → watch → (roll back), for every kind.

One release at a time per kind/name (the receiver guarantees it). The steps are the same for a
policy and a module; what differs is the kind's :class:`~agent.fleet.slots.Slot`:

1. **verify + stage** through :class:`agent.trust.releases.ReleaseStore` — the very same checks as
   ``edge-agent install`` (signature, key scope, digest, floor, validity, content, and the runtime's
   "can this run here"); a rejection is reported with the rule's code and changes nothing;
2. **prepare** off the event loop, once: staging compiled it into the code cache, so this is a
   deserialize and instantiate, not a second compile;
3. **shadow**: a policy is evaluated on the last N recorded decision inputs, counting the results that
   differ from what was decided then (``{evaluated, changed, errors}``); a module has no replayable
   inputs;
4. **switch**: activate in SQLite (the floor rises), then the slot makes it serve — one reference
   swap for a policy (evaluations in flight finish on the old object), between runs for a module;
5. **watch** the health window (traps, failed evaluations or runs incl. deadline hits, a policy's p99
   latency vs the replaced version) and **roll back by itself** when a threshold is crossed: the store
   re-activates ``previous`` (the floor is not lowered) and the slot serves it again.

The window is persisted (:mod:`agent.fleet.watches`): opened before the activation, closed with the
outcome. A window still open when the agent stopped or crashed is resumed by :meth:`resume` after the
restart (a full window again, with the same rules; the replaced version's latency is gone with the
old process, so the latency rule sits that one out), unless the restarts themselves were too many —
then it was already rolled back at start (``crash_loop``). A window whose numbers cannot be read
(a failing database) is never closed as healthy: it keeps watching until they can be.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.errors import AgentError, StorageError
from agent.fleet import watches
from agent.fleet.health import HealthRules, HealthSample, judge
from agent.fleet.receiver import Delivery
from agent.fleet.reporter import ReleaseStatus, StatusReporter
from agent.fleet.slots import Slot, Window
from agent.fleet.watches import Watch
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.trust.errors import ReleaseRejected
from agent.trust.releases import Release, ReleaseStore, ReleaseStoreError

log = get_logger("fleet")

StatusOf = Callable[..., ReleaseStatus]


@dataclass
class SwapCounters:
    received: int = 0
    rejected: int = 0
    activated: int = 0
    rolled_back: int = 0
    healthy: int = 0
    swap_ms: list[float] = field(default_factory=list)


class SwapOrchestrator:
    """Implements :class:`agent.fleet.receiver.ReleaseHandler` over the release store and one slot per kind."""

    def __init__(self, *, node_id: str, releases: ReleaseStore, slots: Mapping[str, Slot[Any]],
                 reporter: StatusReporter, rules: HealthRules,
                 has_newer: Callable[[str, str], bool] | None = None) -> None:
        self.node_id = node_id
        self.releases = releases
        self.slots = dict(slots)
        self.reporter = reporter
        self.rules = rules
        self.has_newer = has_newer
        self.counters = SwapCounters()
        self.timings: dict[str, float] = {}  # the last swap's steps (benchmarks, logs)
        # one install or resumed health window at a time per kind/name; how many installs wait for it
        self._lines: dict[tuple[str, str], asyncio.Lock] = {}
        self._waiting: dict[tuple[str, str], int] = {}

    def _line(self, kind: str, name: str) -> asyncio.Lock:
        return self._lines.setdefault((kind, name), asyncio.Lock())

    def _newer_waiting(self, kind: str, name: str) -> bool:
        """A newer release waits for this kind/name: the running health window ends early for it."""
        if self._waiting.get((kind, name), 0) > 0:
            return True
        return self.has_newer is not None and self.has_newer(kind, name)

    async def _open_watch(self, rel: Release, *, previous_version: int | None, scope: str,
                          shadow: dict[str, int] | None) -> int:
        watch_id = await self.releases.store.writer.run(watches.open_job(
            rel.kind, rel.name, rel.version, rel.sha256, previous_version=previous_version, scope=scope,
            shadow=shadow, window_s=self.rules.window_s))
        log.info("fleet_watch_opened", kind=rel.kind, release=rel.name, version=rel.version,
                 previous=previous_version, window_s=self.rules.window_s)
        return int(watch_id)

    async def _close_watch(self, watch_id: int, rel: Release, state: str, *, code: str = "",
                           message: str = "") -> None:
        await self.releases.store.writer.run(watches.close_job(watch_id, state, code=code, message=message))
        log.info("fleet_watch_closed", kind=rel.kind, release=rel.name, version=rel.version, outcome=state,
                 code=code or None)

    # -- ReleaseHandler ---------------------------------------------------------------------------
    async def current_version(self, kind: str, name: str) -> int:
        return await run_blocking(self.releases.floor, kind, name) or 0

    async def running_version(self, kind: str, name: str) -> int | None:
        active = await run_blocking(self.releases.active, kind, name)
        return active.version if active else None

    async def handle(self, delivery: Delivery) -> str:
        """Install one release; returns the outcome (active, rejected, rolled_back, ignored, …).

        Waits for a resumed health window of the same kind/name (which then ends early for it)."""
        key = (delivery.envelope.kind, delivery.envelope.name)
        lock = self._line(*key)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            await lock.acquire()
        finally:
            self._waiting[key] -= 1
        try:
            return await self._handle(delivery)
        finally:
            lock.release()

    async def _handle(self, delivery: Delivery) -> str:
        env = delivery.envelope
        self.counters.received += 1
        started = time.perf_counter()
        active = await run_blocking(self.releases.active, env.kind, env.name)
        active_version = active.version if active else None

        def status(state: str, **kw: Any) -> ReleaseStatus:
            return ReleaseStatus(node_id=self.node_id, kind=env.kind, name=env.name, version=env.version,
                                 state=state, sha256=env.sha256, scope=str(delivery.scope),
                                 active_version=kw.pop("active_version", active_version), **kw)

        if active is not None and active.version == env.version and active.sha256 == env.sha256:
            await self.reporter.report(status("active"))  # a redelivery of what runs: idempotent
            return "active"
        self.reporter.report_soon(status("received"))
        t_verify = time.perf_counter()
        try:
            rel = await self.releases.astage(env.artifact, env.bundle_json, source=f"fleet:{delivery.scope}")
        except ReleaseRejected as exc:
            self.counters.rejected += 1
            await self.reporter.report(status("rejected", code=exc.code, message=str(exc)))
            return "rejected"
        if (rel.kind, rel.name, rel.version) != (env.kind, env.name, env.version):
            return await self._reject(rel, status, "envelope_mismatch",
                                      f"the envelope says {env.kind} {env.name} v{env.version} but the signed "
                                      f"release is {rel.kind} {rel.name} v{rel.version}")
        if not rel.predicate.targets_node(self.node_id):
            return await self._reject(rel, status, "not_targeted",
                                      f"signed for {list(rel.predicate.targets)}, not this gateway")
        self.timings["verify_stage_ms"] = (time.perf_counter() - t_verify) * 1000
        self.reporter.report_soon(status("verified"))
        slot = self.slots.get(rel.kind)
        if slot is None:
            return await self._reject(rel, status, "kind_unsupported",
                                      f"this agent runs no {rel.kind} runtime; {rel.kind} releases cannot be "
                                      "installed here")
        return await self._swap(slot, env.artifact, rel, status, started, previous_version=active_version,
                                scope=str(delivery.scope))

    async def resume(self, watch: Watch) -> str:
        """Run the health window of a release again after a restart (full window, same rules), then close it.

        The kind's loader (policy service, module service) loads the release as at every start; the
        window judges what it loads (and rolls back a release never loaded within the window)."""
        async with self._line(watch.kind, watch.name):
            rel = await run_blocking(self.releases.active, watch.kind, watch.name)
            if rel is None or (rel.version, rel.sha256) != (watch.version, watch.sha256):
                await self.releases.store.writer.run(watches.close_job(
                    watch.id, "superseded", message="no longer active when its window resumed"))
                log.info("fleet_watch_closed", kind=watch.kind, release=watch.name, version=watch.version,
                         outcome="superseded")
                return "superseded"

            def status(state: str, **kw: Any) -> ReleaseStatus:
                return ReleaseStatus(node_id=self.node_id, kind=watch.kind, name=watch.name, version=watch.version,
                                     state=state, sha256=watch.sha256, scope=watch.scope,
                                     active_version=kw.pop("active_version", watch.version), **kw)

            slot = self.slots.get(rel.kind)
            if slot is None:
                await self._close_watch(watch.id, rel, "cut", message=f"this agent runs no {rel.kind} runtime")
                return "active"
            log.info("fleet_watch_running", kind=watch.kind, release=watch.name, version=watch.version,
                     starts=watch.starts, window_s=self.rules.window_s)
            window = await slot.resumed(rel)
            return await self._watch(slot, rel, window, status=status, shadow=watch.shadow, watch_id=watch.id)

    # -- the steps ----------------------------------------------------------------------------------
    async def _swap(self, slot: Slot[Any], artifact: bytes, rel: Release, status: StatusOf, started: float, *,
                    previous_version: int | None, scope: str) -> str:
        t0 = time.perf_counter()
        try:
            candidate = await slot.prepare(rel, artifact)
        except AgentError as exc:
            return await self._reject(rel, status, exc.code, str(exc))
        t1 = time.perf_counter()
        try:
            shadow = await slot.shadow(candidate)
        except AgentError as exc:  # e.g. the decision log cannot be read
            slot.discard(candidate)
            return await self._reject(rel, status, exc.code, f"shadow evaluation failed: {exc}")
        except sqlite3.Error as exc:
            slot.discard(candidate)
            return await self._reject(rel, status, StorageError.code, f"shadow evaluation failed: {exc}")
        t2 = time.perf_counter()
        # the window is on record before the release can run: a crash from here on resumes it
        watch_id = await self._open_watch(rel, previous_version=previous_version, scope=scope, shadow=shadow)
        try:
            await self.releases.aactivate(rel.id)
        except (ReleaseRejected, ReleaseStoreError) as exc:
            await self.releases.store.writer.run(watches.discard_job(watch_id))
            slot.discard(candidate)
            return await self._reject(rel, status, exc.code, str(exc), shadow=shadow)
        window = await slot.switch(candidate)
        t3 = time.perf_counter()
        self.counters.activated += 1
        self.counters.swap_ms.append((t3 - started) * 1000)
        self.timings.update(load_ms=(t1 - t0) * 1000, shadow_ms=(t2 - t1) * 1000, activate_ms=(t3 - t2) * 1000,
                            total_ms=(t3 - started) * 1000)
        log.info("fleet_release_active", kind=rel.kind, release=rel.name, version=rel.version, shadow=shadow,
                 previous=previous_version, timings_ms={k: round(v, 1) for k, v in self.timings.items()})
        await self.reporter.report(status("active", shadow=shadow, active_version=rel.version))
        return await self._watch(slot, rel, window, status=status, shadow=shadow, watch_id=watch_id)

    async def _watch(self, slot: Slot[Any], rel: Release, window: Window, *, status: StatusOf,
                     shadow: dict[str, int] | None, watch_id: int) -> str:
        """The health window of ``rel``: judge what it did until the window ends, a rule is crossed, a
        newer release arrives, or another version serves the name."""
        deadline = time.monotonic() + self.rules.window_s
        verdict: tuple[str, str] | None = None
        sample: HealthSample | None = None
        unreadable: str | None = None
        while time.monotonic() < deadline or unreadable is not None:
            await asyncio.sleep(slot.poll_s)
            serving = window.serving()
            if serving is not None and serving != rel.version:
                why = f"version {serving} was activated meanwhile"
                log.info("fleet_health_window_cut", kind=rel.kind, release=rel.name, version=rel.version, reason=why)
                await self._close_watch(watch_id, rel, "superseded", message=why)
                return "active"
            try:
                current = await window.sample()
            except (StorageError, sqlite3.Error) as exc:
                # never judged healthy on numbers that could not be read: keep watching until they can be
                if unreadable is None:
                    log.error("fleet_health_unreadable", kind=rel.kind, release=rel.name, version=rel.version,
                              error=str(exc))
                unreadable = str(exc)
            else:
                if unreadable is not None:
                    log.info("fleet_health_readable_again", kind=rel.kind, release=rel.name, version=rel.version)
                unreadable = None
                if current is not None:
                    sample = current
                    verdict = judge(current, self.rules, window.buckets_us, window.baseline_p99_us)
                    if verdict is not None:
                        break
            if self._newer_waiting(rel.kind, rel.name):
                log.info("fleet_health_window_cut", kind=rel.kind, release=rel.name, version=rel.version,
                         reason="newer release")
                await self._close_watch(watch_id, rel, "cut", message="a newer release arrived")
                return "active"
        if verdict is None and sample is None:
            verdict = ("health_not_loaded", f"{rel.kind} {rel.name} v{rel.version} was not loaded within its "
                       "health window after a restart (see the agent's recent errors)")
        summary = sample.to_dict() if sample is not None else {}
        if verdict is None:
            self.counters.healthy += 1
            log.info("fleet_release_healthy", kind=rel.kind, release=rel.name, version=rel.version, window=summary)
            await self._close_watch(watch_id, rel, "healthy")
            return "active"
        code, why = verdict
        log.warning("fleet_release_unhealthy", kind=rel.kind, release=rel.name, version=rel.version, code=code,
                    why=why, window=summary)
        return await self._rollback(rel, window, status=status, code=code, why=why, shadow=shadow,
                                    watch_id=watch_id)

    async def _still_active(self, rel: Release, watch_id: int) -> bool:
        """Before a rollback: the watched release must still be the active one (not one installed by hand)."""
        active = await run_blocking(self.releases.active, rel.kind, rel.name)
        if active is not None and (active.version, active.sha256) == (rel.version, rel.sha256):
            return True
        await self._close_watch(watch_id, rel, "superseded",
                                message=f"no longer active (v{active.version if active else None} is)")
        return False

    async def _rollback(self, rel: Release, window: Window, *, status: StatusOf, code: str, why: str,
                        shadow: dict[str, int] | None, watch_id: int) -> str:
        if not await self._still_active(rel, watch_id):
            return "active"
        try:
            restored = await self.releases.arollback(rel.kind, rel.name)
        except ReleaseStoreError as exc:
            # first release of this name: nothing to return to; keep it and say so
            message = f"{why}; cannot roll back: {exc}"
            await self.reporter.report(status("active", code=code, shadow=shadow, active_version=rel.version,
                                              message=message))
            await self._close_watch(watch_id, rel, "kept", code=code, message=message)
            return "active"
        await window.restore(restored)
        self.counters.rolled_back += 1
        await self.reporter.report(status("rolled_back", code=code, message=why, shadow=shadow,
                                          active_version=restored.version))
        await self._close_watch(watch_id, rel, "rolled_back", code=code, message=why)
        return "rolled_back"

    async def _reject(self, rel: Release, status: StatusOf, code: str, message: str,
                      shadow: dict[str, int] | None = None) -> str:
        """A staged release that will not run: retire it and say why (nothing else changed)."""
        await self._retire(rel)
        self.counters.rejected += 1
        await self.reporter.report(status("rejected", code=code, message=message, shadow=shadow))
        return "rejected"

    async def _retire(self, rel: Release) -> None:
        try:
            await self.releases.aretire(rel.id)
        except ReleaseStoreError as exc:
            log.warning("fleet_release_retire_failed", release=rel.name, version=rel.version, error=str(exc))
