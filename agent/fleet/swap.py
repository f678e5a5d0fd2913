"""The swap orchestrator: verify → compile → shadow-evaluate → switch → watch → (roll back).

One release at a time per kind/name (the receiver guarantees it). For a policy:

1. **verify + stage** through :class:`agent.trust.releases.ReleaseStore` — the very same checks as
   ``edge-agent install`` (signature, key scope, digest, floor, validity, content); a rejection is
   reported with the trust rule's code and changes nothing;
2. **compile** off the event loop, once: staging compiles it (to refuse what this agent cannot load)
   into the code cache, and the swap deserializes that (~1 ms) instead of compiling again;
3. **shadow-evaluate** the new policy on the last N recorded decision inputs and count how many
   results differ from what was decided then (``{evaluated, changed, errors}``);
4. **switch**: activate in SQLite (the floor rises), then one reference swap in the
   :class:`PolicyRegistry` — evaluations in flight finish on the old object, new ones use the new;
   nothing waits on a lock held across a compile;
5. **watch** the health window (traps, failed evaluations incl. deadline hits, p99 latency vs the
   replaced version) and **roll back by itself** when a threshold is crossed: the store
   re-activates ``previous`` (the floor is not lowered) and the registry gets the old object back.

The window is persisted (:mod:`agent.fleet.watches`): opened before the activation, closed with the
outcome. A window still open when the agent stopped or crashed is resumed by :meth:`resume` after the
restart (a full window again, with the same rules; the replaced version's latency is gone with the
old process, so the latency rule sits that one out), unless the restarts themselves were too many —
then it was already rolled back at start (``crash_loop``).

Modules go the same way, except the switch happens *between* runs (``ModuleRegistry.swap`` waits
for the run in flight) and there is no shadow evaluation (a module's effects are not replayable).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from agent.errors import AgentError
from agent.fleet import watches
from agent.fleet.health import HealthRules, HealthSample, judge, quantile_us
from agent.fleet.receiver import Delivery
from agent.fleet.reporter import ReleaseStatus, StatusReporter
from agent.fleet.watches import Watch
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.policy.engine import LATENCY_BUCKETS_US, Policy
from agent.policy.runtime import PolicyRuntime
from agent.runtime.modules import ModuleRuntime
from agent.storage.db import connect_reader
from agent.trust.errors import ReleaseRejected
from agent.trust.releases import Release, ReleaseStore, ReleaseStoreError

log = get_logger("fleet")

HEALTH_POLL_S = 0.05

# module run outcomes that are the guest's fault in a way a rollback fixes (not e.g. "ok")
_MODULE_TRAPS = ("trap", "memory", "deadline", "timeout", "exit")


def _last_run_id(db_path: Path) -> int:
    conn = connect_reader(db_path)
    try:
        row = conn.execute("SELECT max(id) FROM module_runs").fetchone()
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()
    return int(row[0] or 0)


def _module_window(db_path: Path, name: str, version: int, after_id: int) -> HealthSample:
    """Runs of name@version since activation, as a health sample (failed runs = errors)."""
    conn = connect_reader(db_path)
    try:
        rows = conn.execute("SELECT outcome, count(*) FROM module_runs WHERE name = ? AND version = ? AND id > ? "
                            "GROUP BY outcome", (name, version, after_id)).fetchall()
    except sqlite3.OperationalError:
        return HealthSample()
    finally:
        conn.close()
    ok = sum(int(n) for o, n in rows if o == "ok")
    failed = sum(int(n) for o, n in rows if o != "ok")
    traps = sum(int(n) for o, n in rows if o != "ok" and any(t in str(o) for t in _MODULE_TRAPS))
    deadline = sum(int(n) for o, n in rows if "deadline" in str(o) or "timeout" in str(o))
    return HealthSample(evals=ok, errors=failed, traps=traps, deadline_hits=deadline)


@dataclass
class SwapCounters:
    received: int = 0
    rejected: int = 0
    activated: int = 0
    rolled_back: int = 0
    healthy: int = 0
    swap_ms: list[float] = field(default_factory=list)


def recent_decisions(db_path: Path, policy_name: str, limit: int) -> list[tuple[str, str, str]]:
    """The last ``limit`` recorded (input, entrypoint, result) of ``policy_name``, oldest first."""
    if limit <= 0:
        return []
    conn = connect_reader(db_path)
    try:
        rows = conn.execute("SELECT input, entrypoint, result FROM decisions WHERE policy_name = ? "
                            "ORDER BY id DESC LIMIT ?", (policy_name, limit)).fetchall()
    except sqlite3.OperationalError:  # no decisions table yet (older schema): nothing to replay
        return []
    finally:
        conn.close()
    return [(str(i), str(e), str(r)) for i, e, r in reversed(rows)]


def shadow_evaluate(policy: Policy, rows: list[tuple[str, str, str]]) -> dict[str, int]:
    """Evaluate ``policy`` on recorded inputs; count results that differ from the recorded ones.

    A recorded result may be the whole result set or just its value (``result[0].result``): a
    decision counts as unchanged when the new evaluation matches either form.
    """
    evaluated = changed = errors = 0
    for raw_input, entrypoint, raw_result in rows:
        try:
            doc = json.loads(raw_input)
            recorded = json.loads(raw_result)
        except json.JSONDecodeError:
            continue
        evaluated += 1
        try:
            rs = policy.evaluate(doc, entrypoint or None)
        except AgentError:
            errors += 1
            changed += 1
            continue
        if recorded != rs.raw and not (rs.defined and recorded == rs.value):
            changed += 1
    return {"evaluated": evaluated, "changed": changed, "errors": errors}


class SwapOrchestrator:
    """Implements :class:`agent.fleet.receiver.ReleaseHandler` over the real stores and registries."""

    def __init__(self, *, node_id: str, releases: ReleaseStore, policies: PolicyRuntime,
                 reporter: StatusReporter, rules: HealthRules, shadow_inputs: int,
                 modules: ModuleRuntime | None = None,
                 has_newer: Callable[[str, str], bool] | None = None) -> None:
        self.node_id = node_id
        self.releases = releases
        self.policy_runtime = policies
        self.policies = policies.registry
        self.reporter = reporter
        self.rules = rules
        self.shadow_inputs = shadow_inputs
        self.modules = modules
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
            await self._retire(rel)
            self.counters.rejected += 1
            await self.reporter.report(status(
                "rejected", code="envelope_mismatch",
                message=f"the envelope says {env.kind} {env.name} v{env.version} but the signed release is "
                f"{rel.kind} {rel.name} v{rel.version}"))
            return "rejected"
        if not rel.predicate.targets_node(self.node_id):
            await self._retire(rel)
            self.counters.rejected += 1
            why = f"signed for {list(rel.predicate.targets)}, not this gateway"
            await self.reporter.report(status("rejected", code="not_targeted", message=why))
            return "rejected"
        self.timings["verify_stage_ms"] = (time.perf_counter() - t_verify) * 1000
        self.reporter.report_soon(status("verified"))
        if rel.kind == "policy":
            return await self._swap_policy(env.artifact, rel, status, started,
                                           previous_version=active_version, scope=str(delivery.scope))
        return await self._swap_module(env.artifact, rel, status, started, previous_version=active_version,
                                       scope=str(delivery.scope))

    async def resume(self, watch: Watch) -> str:
        """Run the health window of a release again after a restart (full window, same rules), then close it.

        The policy loader / module service load the release as at every start; the window judges the
        object they load (and, for a policy never loaded within the window, rolls back)."""
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

            log.info("fleet_watch_running", kind=watch.kind, release=watch.name, version=watch.version,
                     starts=watch.starts, window_s=self.rules.window_s)
            if rel.kind == "policy":
                return await self._watch_policy(rel, None, None, baseline=HealthSample(), status=status,
                                                shadow=watch.shadow or {}, watch_id=watch.id)
            if self.modules is None:
                await self._close_watch(watch.id, rel, "cut", message="this agent runs no module runtime")
                return "active"
            return await self._watch_module(rel, self.modules, status, watch.id)

    # -- policies ---------------------------------------------------------------------------------
    async def _swap_policy(self, artifact: bytes, rel: Release, status: Callable[..., ReleaseStatus],
                           started: float, *, previous_version: int | None = None, scope: str = "") -> str:
        t0 = time.perf_counter()
        try:
            # staging compiled it into the code cache: this is a ~1 ms deserialize, not a second compile
            policy = await self.policy_runtime.aload(rel, artifact)
        except AgentError as exc:
            await self._retire(rel)
            self.counters.rejected += 1
            await self.reporter.report(status("rejected", code=exc.code, message=str(exc)))
            return "rejected"
        t1 = time.perf_counter()
        rows = await run_blocking(recent_decisions, self.releases.store.path, rel.name, self.shadow_inputs)
        shadow = await run_blocking(shadow_evaluate, policy, rows) if rows else \
            {"evaluated": 0, "changed": 0, "errors": 0}
        baseline = HealthSample.of(policy.stats)  # shadow evaluations do not count in the window
        t2 = time.perf_counter()
        # the window is on record before the release can run: a crash from here on resumes it
        watch_id = await self._open_watch(rel, previous_version=previous_version, scope=scope, shadow=shadow)
        try:
            await self.releases.aactivate(rel.id)
        except (ReleaseRejected, ReleaseStoreError) as exc:
            await self.releases.store.writer.run(watches.discard_job(watch_id))
            self.counters.rejected += 1
            await self.reporter.report(status("rejected", code=exc.code, message=str(exc), shadow=shadow))
            return "rejected"
        old = self.policies.swap(rel.name, policy)
        t3 = time.perf_counter()
        self.counters.activated += 1
        self.counters.swap_ms.append((t3 - started) * 1000)
        self.timings.update(load_ms=(t1 - t0) * 1000, shadow_ms=(t2 - t1) * 1000, activate_ms=(t3 - t2) * 1000,
                            total_ms=(t3 - started) * 1000)
        log.info("fleet_policy_active", release=rel.name, version=rel.version, shadow=shadow,
                 previous=old.version if old else None,
                 timings_ms={k: round(v, 1) for k, v in self.timings.items()})
        await self.reporter.report(status("active", shadow=shadow, active_version=rel.version))
        return await self._watch_policy(rel, policy, old, baseline=baseline, status=status, shadow=shadow,
                                        watch_id=watch_id)

    async def _watch_policy(self, rel: Release, policy: Policy | None, old: Policy | None, *,
                            baseline: HealthSample, status: Callable[..., ReleaseStatus], shadow: dict[str, int],
                            watch_id: int) -> str:
        """The health window of ``rel``; ``policy`` None = resumed after a restart: watch what the policy
        loader loads (a policy still not loaded when the window ends is rolled back)."""
        old_p99 = quantile_us(tuple(old.stats.latency_us), LATENCY_BUCKETS_US, 0.99) if old else None
        if old is not None and old.stats.evals < self.rules.min_evals:
            old_p99 = None  # too little history to compare against
        deadline = time.monotonic() + self.rules.window_s
        verdict: tuple[str, str] | None = None
        while time.monotonic() < deadline:
            await asyncio.sleep(HEALTH_POLL_S)
            current = self.policies.get(rel.name)
            if current is not policy and current is not None:
                if current.version != rel.version:
                    why = f"version {current.version} was activated meanwhile"
                    log.info("fleet_health_window_cut", release=rel.name, version=rel.version, reason=why)
                    await self._close_watch(watch_id, rel, "superseded", message=why)
                    return "active"
                # the release watcher (re)loaded the same release: watch the object that serves
                policy, baseline = current, HealthSample()
            if policy is not None:
                verdict = judge(HealthSample.of(policy.stats).minus(baseline), self.rules, LATENCY_BUCKETS_US,
                                old_p99)
                if verdict is not None:
                    break
            if self._newer_waiting(rel.kind, rel.name):
                log.info("fleet_health_window_cut", release=rel.name, version=rel.version, reason="newer release")
                await self._close_watch(watch_id, rel, "cut", message="a newer release arrived")
                return "active"
        if policy is None:
            window: dict[str, Any] = {}
            verdict = ("health_not_loaded", f"{rel.name} v{rel.version} was not loaded within its health window "
                       "after a restart (see the agent's recent errors)")
        else:
            window = HealthSample.of(policy.stats).minus(baseline).to_dict()
        if verdict is None:
            self.counters.healthy += 1
            log.info("fleet_release_healthy", release=rel.name, version=rel.version, window=window)
            await self._close_watch(watch_id, rel, "healthy")
            return "active"
        code, why = verdict
        return await self._rollback_policy(rel, policy, old, status=status, code=code, why=why, shadow=shadow,
                                           window=window, watch_id=watch_id)

    async def _still_active(self, rel: Release, watch_id: int) -> bool:
        """Before a rollback: the watched release must still be the active one (not one installed by hand)."""
        active = await run_blocking(self.releases.active, rel.kind, rel.name)
        if active is not None and (active.version, active.sha256) == (rel.version, rel.sha256):
            return True
        await self._close_watch(watch_id, rel, "superseded",
                                message=f"no longer active (v{active.version if active else None} is)")
        return False

    async def _rollback_policy(self, rel: Release, bad: Policy | None, old: Policy | None, *,
                               status: Callable[..., ReleaseStatus], code: str, why: str,
                               shadow: dict[str, int], window: dict[str, Any], watch_id: int) -> str:
        log.warning("fleet_release_unhealthy", release=rel.name, version=rel.version, code=code, why=why, window=window)
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
        previous = old
        if previous is None or previous.version != restored.version:
            artifact = await self.releases.aartifact_bytes(restored.sha256)
            previous = await self.policy_runtime.aload(restored, artifact)
        self.policies.swap(rel.name, previous)
        if bad is not None:
            bad.close()
        self.counters.rolled_back += 1
        await self.reporter.report(status("rolled_back", code=code, message=why, shadow=shadow,
                                          active_version=restored.version))
        await self._close_watch(watch_id, rel, "rolled_back", code=code, message=why)
        return "rolled_back"

    # -- modules ----------------------------------------------------------------------------------
    async def _swap_module(self, artifact: bytes, rel: Release, status: Callable[..., ReleaseStatus],
                           started: float, *, previous_version: int | None = None, scope: str = "") -> str:
        runtime = self.modules
        if runtime is None:
            await self._retire(rel)
            self.counters.rejected += 1
            await self.reporter.report(status("rejected", code="kind_unsupported",
                                              message="this agent runs no module runtime; module releases "
                                              "cannot be installed here"))
            return "rejected"
        previous = runtime.registry.get(rel.name)
        # on record before the new version can run: a crash from here on resumes the window
        watch_id = await self._open_watch(rel, previous_version=previous_version, scope=scope, shadow=None)
        try:
            # compiles off the loop (code cache), then swaps between runs (waits for the run in flight)
            await runtime.load_release(rel.name, rel.version, rel.sha256, artifact, dict(rel.predicate.raw))
            await self.releases.aactivate(rel.id)
        except (AgentError, wasmtime.WasmtimeError) as exc:
            await self.releases.store.writer.run(watches.discard_job(watch_id))
            if previous is not None and (cur := runtime.registry.get(rel.name)) is not None \
                    and cur.version == rel.version:
                await runtime.registry.swap(previous)
            await self._retire(rel)
            self.counters.rejected += 1
            code = exc.code if isinstance(exc, AgentError) else "invalid_wasm"
            await self.reporter.report(status("rejected", code=code, message=str(exc).splitlines()[0][:500]))
            return "rejected"
        self.counters.activated += 1
        self.counters.swap_ms.append((time.perf_counter() - started) * 1000)
        await self.reporter.report(status("active", active_version=rel.version))
        return await self._watch_module(rel, runtime, status, watch_id)

    async def _watch_module(self, rel: Release, runtime: ModuleRuntime, status: Callable[..., ReleaseStatus],
                            watch_id: int) -> str:
        """The health window of a module release: its failed runs (``module_runs``) since the window began.
        Resumed after a restart, the module service loads it; one never loaded in the window is rolled back."""
        first_run_id = await run_blocking(_last_run_id, self.releases.store.path)
        deadline = time.monotonic() + self.rules.window_s
        verdict: tuple[str, str] | None = None
        sample = HealthSample()
        loaded = False
        while time.monotonic() < deadline:
            await asyncio.sleep(max(HEALTH_POLL_S, 0.2))
            sample = await run_blocking(_module_window, self.releases.store.path, rel.name, rel.version, first_run_id)
            verdict = judge(sample, self.rules, LATENCY_BUCKETS_US, None)
            if verdict is not None:
                break
            current = runtime.registry.get(rel.name)
            if current is not None and current.version != rel.version:
                why = f"version {current.version} was activated meanwhile"
                log.info("fleet_health_window_cut", kind="module", release=rel.name, version=rel.version, reason=why)
                await self._close_watch(watch_id, rel, "superseded", message=why)
                return "active"
            loaded = loaded or current is not None
            if self._newer_waiting(rel.kind, rel.name):
                log.info("fleet_health_window_cut", kind="module", release=rel.name, version=rel.version,
                         reason="newer release")
                await self._close_watch(watch_id, rel, "cut", message="a newer release arrived")
                return "active"
        if verdict is None and not loaded and runtime.registry.get(rel.name) is None:
            verdict = ("health_not_loaded", f"module {rel.name} v{rel.version} was not loaded within its health "
                       "window after a restart (see the agent's recent errors)")
        if verdict is None:
            self.counters.healthy += 1
            log.info("fleet_release_healthy", kind="module", release=rel.name, version=rel.version,
                     window=sample.to_dict())
            await self._close_watch(watch_id, rel, "healthy")
            return "active"
        code, why = verdict
        log.warning("fleet_release_unhealthy", kind="module", release=rel.name, version=rel.version, code=code,
                    why=why, window=sample.to_dict())
        if not await self._still_active(rel, watch_id):
            return "active"
        try:
            restored = await self.releases.arollback(rel.kind, rel.name)
        except ReleaseStoreError as exc:
            message = f"{why}; cannot roll back: {exc}"
            await self.reporter.report(status("active", code=code, active_version=rel.version, message=message))
            await self._close_watch(watch_id, rel, "kept", code=code, message=message)
            return "active"
        wasm = await self.releases.aartifact_bytes(restored.sha256)
        await runtime.load_release(restored.name, restored.version, restored.sha256, wasm,
                                   dict(restored.predicate.raw))
        self.counters.rolled_back += 1
        await self.reporter.report(status("rolled_back", code=code, message=why, active_version=restored.version))
        await self._close_watch(watch_id, rel, "rolled_back", code=code, message=why)
        return "rolled_back"

    async def _retire(self, rel: Release) -> None:
        try:
            await self.releases.aretire(rel.id)
        except ReleaseStoreError as exc:
            log.warning("fleet_release_retire_failed", release=rel.name, version=rel.version, error=str(exc))
