"""The runtime slots the swap orchestrator hot-swaps into: one per kind, behind one small protocol.

The orchestrator (:mod:`agent.fleet.swap`) knows the steps every release goes through — stage,
prepare, shadow, open the watch, activate, switch, watch, roll back — and nothing of what a policy or
a module is. A :class:`Slot` does the kind's part with the kind's runtime (the same one the daemon
loads releases with at start, so a hot-swapped release and the same release after a restart are the
same object), and a :class:`Window` is the health window of one switched release: what serves the
name now, what the release did since it started serving, and how to serve the restored release after
a rollback.

- :class:`PolicySlot` over the :class:`~agent.policy.runtime.PolicyRuntime`: the shadow evaluation
  replays recorded decisions; the switch is one reference swap in the registry (evaluations in flight
  finish on the old object); the window reads the policy's own counters and compares its p99 latency
  with the replaced version's.
- :class:`ModuleSlot` over the :class:`~agent.runtime.modules.ModuleRuntime`: no shadow (a module's
  effects are not replayable); the switch happens between runs; the window reads ``module_runs``.

A window's sample that cannot be read (a failing or locked database) raises: the orchestrator never
judges a release healthy on numbers it could not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, TypeVar

import wasmtime

from agent import jsonsafe
from agent.errors import AgentError
from agent.fleet.health import HealthSample, quantile_us
from agent.offload import run_blocking
from agent.policy.engine import LATENCY_BUCKETS_US, Policy
from agent.policy.runtime import PolicyRuntime
from agent.runtime.modules import ModuleRuntime
from agent.runtime.registry import LoadedModule
from agent.storage.db import connect_reader, table_exists
from agent.trust.releases import Release, ReleaseStore

C = TypeVar("C")

HEALTH_POLL_S = 0.05
RECORDED_LIMITS = jsonsafe.Limits(64 * 1024 * 1024, max_depth=2 * jsonsafe.DEFAULT_MAX_DEPTH,
                                  max_int_digits=jsonsafe.BIG_INT_DIGITS)
MODULE_POLL_S = 0.2  # a module window reads SQLite: a little slower than the policy's counters
# module run outcomes that are the guest's fault in a way a rollback fixes (not e.g. "ok")
_MODULE_TRAPS = ("trap", "memory", "deadline", "timeout", "exit")


class Window(Protocol):
    """The health window of one release that serves (or, resumed after a restart, should serve)."""

    #: the latency buckets of :attr:`HealthSample.latency_counts`, and the replaced release's p99 in
    #: them (None: no comparison, e.g. too little history or after a restart)
    buckets_us: tuple[int, ...]
    baseline_p99_us: float | None

    def serving(self) -> int | None:
        """The version serving the name now (None: nothing is loaded under it)."""
        ...

    async def sample(self) -> HealthSample | None:
        """What the release did since its window began; None while it is not loaded. Raises when the
        numbers cannot be read (never an empty sample in their place)."""
        ...

    async def restore(self, restored: Release) -> None:
        """Serve ``restored`` again (the store already re-activated it) and let the bad release go."""
        ...


class Slot(Protocol[C]):
    """One kind's part of a hot swap. ``C`` is the kind's prepared candidate (compiled, not serving)."""

    kind: str
    poll_s: float

    async def prepare(self, release: Release, artifact: bytes) -> C:
        """Compile and load the release without serving it; raises an :class:`AgentError` naming why not."""
        ...

    async def shadow(self, candidate: C) -> dict[str, int] | None:
        """Try the candidate on recorded inputs: ``{evaluated, changed, errors}``; None when the kind has no
        replayable inputs."""
        ...

    async def switch(self, candidate: C) -> Window:
        """Make the candidate serve (the store has activated it); returns its health window."""
        ...

    def discard(self, candidate: C) -> None:
        """The candidate will never serve (its activation failed): free it."""
        ...

    async def resumed(self, release: Release) -> Window:
        """The window of ``release`` after a restart: the kind's loader loads it, the window watches that."""
        ...


class SlotUnavailable(AgentError):
    """What a slot needs to prepare a release is missing or broken (e.g. the Wasm does not compile)."""

    code = "invalid_wasm"


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# ------------------------------------------------------------------------------------------- policies

def recent_decisions(db_path: Path, policy_name: str, limit: int) -> list[tuple[str, str, str]]:
    """The last ``limit`` recorded (input, entrypoint, result) of ``policy_name``, oldest first.

    An older schema without a decision log has nothing to replay; a database that cannot be read
    raises (the release is then not shadow-evaluated as if there were no decisions)."""
    if limit <= 0:
        return []
    conn = connect_reader(db_path, stale_ok=False)
    try:
        if not table_exists(conn, "decisions"):
            return []
        rows = conn.execute("SELECT input, entrypoint, result FROM decisions WHERE policy_name = ? "
                            "ORDER BY id DESC LIMIT ?", (policy_name, limit)).fetchall()
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
        try:  # a row an older agent stored with NaN in it is no evidence either way: skipped
            doc = jsonsafe.loads(raw_input, RECORDED_LIMITS)
            recorded = jsonsafe.loads(raw_result, RECORDED_LIMITS)
        except jsonsafe.JsonRejected:
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


class PolicyWindow:
    buckets_us: tuple[int, ...] = LATENCY_BUCKETS_US

    def __init__(self, runtime: PolicyRuntime, releases: ReleaseStore, name: str, version: int, *,
                 policy: Policy | None, old: Policy | None, baseline: HealthSample, min_evals: int) -> None:
        self.runtime = runtime
        self.releases = releases
        self.name = name
        self.version = version
        self.policy = policy
        self.old = old
        self.baseline = baseline
        # too little history of the replaced version to compare against: the latency rule sits out
        self.baseline_p99_us = quantile_us(tuple(old.stats.latency_us), LATENCY_BUCKETS_US, 0.99) \
            if old is not None and old.stats.evals >= min_evals else None

    def serving(self) -> int | None:
        current = self.runtime.registry.get(self.name)
        return None if current is None else current.version

    async def sample(self) -> HealthSample | None:
        current = self.runtime.registry.get(self.name)
        if current is not None and current is not self.policy and current.version == self.version:
            # the policy loader (re)loaded the same release: watch the object that serves
            self.policy, self.baseline = current, HealthSample()
        if self.policy is None:
            return None
        return HealthSample.of(self.policy.stats).minus(self.baseline)

    async def restore(self, restored: Release) -> None:
        previous = self.old
        if previous is None or previous.version != restored.version:
            artifact = await self.releases.aartifact_bytes(restored.sha256)
            previous = await self.runtime.aload(restored, artifact)
        self.runtime.registry.swap(self.name, previous)
        if self.policy is not None:
            self.policy.close()


class PolicySlot:
    kind = "policy"
    poll_s = HEALTH_POLL_S

    def __init__(self, runtime: PolicyRuntime, releases: ReleaseStore, *, shadow_inputs: int,
                 min_evals: int) -> None:
        self.runtime = runtime
        self.releases = releases
        self.shadow_inputs = shadow_inputs
        self.min_evals = min_evals

    async def prepare(self, release: Release, artifact: bytes) -> tuple[Release, Policy]:
        # staging compiled it into the code cache: this is a ~1 ms deserialize, not a second compile
        return release, await self.runtime.aload(release, artifact)

    async def shadow(self, candidate: tuple[Release, Policy]) -> dict[str, int]:
        release, policy = candidate
        rows = await run_blocking(recent_decisions, self.releases.store.path, release.name, self.shadow_inputs)
        if not rows:
            return {"evaluated": 0, "changed": 0, "errors": 0}
        return await run_blocking(shadow_evaluate, policy, rows)

    async def switch(self, candidate: tuple[Release, Policy]) -> PolicyWindow:
        release, policy = candidate
        baseline = HealthSample.of(policy.stats)  # shadow evaluations do not count in the window
        old = self.runtime.registry.swap(release.name, policy)
        return PolicyWindow(self.runtime, self.releases, release.name, release.version, policy=policy, old=old,
                            baseline=baseline, min_evals=self.min_evals)

    def discard(self, candidate: tuple[Release, Policy]) -> None:
        candidate[1].close()

    async def resumed(self, release: Release) -> PolicyWindow:
        return PolicyWindow(self.runtime, self.releases, release.name, release.version, policy=None, old=None,
                            baseline=HealthSample(), min_evals=self.min_evals)


# -------------------------------------------------------------------------------------------- modules

def last_run_id(db_path: Path) -> int:
    """The newest ``module_runs`` id (0: none yet, or a schema without the table)."""
    conn = connect_reader(db_path, stale_ok=False)
    try:
        if not table_exists(conn, "module_runs"):
            return 0
        row = conn.execute("SELECT max(id) FROM module_runs").fetchone()
    finally:
        conn.close()
    return int(row[0] or 0)


def module_sample(db_path: Path, name: str, version: int, after_id: int) -> HealthSample:
    """Runs of name@version after run ``after_id``, as a health sample (failed runs = errors)."""
    conn = connect_reader(db_path, stale_ok=False)
    try:
        if not table_exists(conn, "module_runs"):
            return HealthSample()
        rows: list[tuple[Any, Any]] = conn.execute(
            "SELECT outcome, count(*) FROM module_runs WHERE name = ? AND version = ? AND id > ? GROUP BY outcome",
            (name, version, after_id)).fetchall()
    finally:
        conn.close()
    ok = sum(int(n) for o, n in rows if o == "ok")
    failed = sum(int(n) for o, n in rows if o != "ok")
    traps = sum(int(n) for o, n in rows if o != "ok" and any(t in str(o) for t in _MODULE_TRAPS))
    deadline = sum(int(n) for o, n in rows if "deadline" in str(o) or "timeout" in str(o))
    return HealthSample(evals=ok, errors=failed, traps=traps, deadline_hits=deadline)


class ModuleWindow:
    buckets_us: tuple[int, ...] = ()
    baseline_p99_us: float | None = None

    def __init__(self, runtime: ModuleRuntime, releases: ReleaseStore, name: str, version: int,
                 first_run_id: int) -> None:
        self.runtime = runtime
        self.releases = releases
        self.name = name
        self.version = version
        self.first_run_id = first_run_id

    def serving(self) -> int | None:
        current = self.runtime.registry.get(self.name)
        return None if current is None else current.version

    async def sample(self) -> HealthSample | None:
        if self.runtime.registry.get(self.name) is None:
            return None
        return await run_blocking(module_sample, self.releases.store.path, self.name, self.version,
                                  self.first_run_id)

    async def restore(self, restored: Release) -> None:
        wasm = await self.releases.aartifact_bytes(restored.sha256)
        await self.runtime.load_release(restored.name, restored.version, restored.sha256, wasm,
                                        dict(restored.predicate.raw))


class ModuleSlot:
    kind = "module"
    poll_s = MODULE_POLL_S

    def __init__(self, runtime: ModuleRuntime, releases: ReleaseStore) -> None:
        self.runtime = runtime
        self.releases = releases

    async def prepare(self, release: Release, artifact: bytes) -> LoadedModule:
        try:
            # compiles off the loop (through the code cache); nothing runs it yet
            return await self.runtime.prepare(release.name, release.version, release.sha256, artifact,
                                              dict(release.predicate.raw))
        except wasmtime.WasmtimeError as exc:
            raise SlotUnavailable(_first_line(exc)) from exc

    async def shadow(self, candidate: LoadedModule) -> None:
        return None

    async def switch(self, candidate: LoadedModule) -> ModuleWindow:
        await self.runtime.activate(candidate)  # waits for the run in flight: runs never mix versions
        first = await run_blocking(last_run_id, self.releases.store.path)
        return ModuleWindow(self.runtime, self.releases, candidate.name, candidate.version, first)

    def discard(self, candidate: LoadedModule) -> None:
        pass  # compiled code only: nothing to free

    async def resumed(self, release: Release) -> ModuleWindow:
        first = await run_blocking(last_run_id, self.releases.store.path)
        return ModuleWindow(self.runtime, self.releases, release.name, release.version, first)
