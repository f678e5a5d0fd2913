"""The module runtime: load releases, run modules (sandboxed, recorded), batch topic triggers.

The interface other components use (the composition root hands the runtime to them):

- ``await runtime.run(name, trigger=None, readings=None) -> ModuleOutput`` — one run now; raises
  :class:`ModuleRunFailed` (with ``outcome`` and ``run_id``) if the module misbehaved. The failure
  is already recorded; nothing else is affected.
- ``runtime.offer(readings)`` — the local bus hands over readings *after* storing them durably; every
  module whose ``trigger.topics`` match gets them, batched over its ``batch_window_ms``, one run in
  flight per module. Never blocks, never raises for module faults.
- ``runtime.set_sink(async fn(output))`` — where the outputs of *triggered* runs (schedule, topic) go:
  the messaging pipeline (policy gate → actuation / properties / events / telemetry). ``run()``
  returns its output to the caller instead and does not call the sink.
- ``await runtime.load_release(name, version, sha256, wasm, predicate)`` / ``await runtime.unload(name)``
  — what the module service calls on release changes; ``runtime.registry`` is the
  :class:`ModuleRegistry` (hot swap); ``runtime.check`` is the install-time "can this run" check the
  release store is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils
import wasmtime

from agent import clock, jsonsafe
from agent.config.modules import ModuleSettings
from agent.errors import AgentError
from agent.handlers import Handler, Handlers
from agent.logs import get_logger
from agent.messaging import topics
from agent.messaging.readings import Reading as BusReading
from agent.offload import run_blocking
from agent.runtime import runner as R
from agent.runtime.contract import (
    OUTPUT_MAX_DEPTH,
    ModuleError,
    ModuleOutput,
    ModuleOutputInvalid,
    Reading,
    build_input,
    make_trigger,
    parse_output,
)
from agent.runtime.registry import LoadedModule, ModuleNotLoaded, ModuleRegistry
from agent.runtime.runner import Limits, ModuleRunner, Permissions, RawRun
from agent.runtime.spec import (
    ModuleSpec,
    ModuleSpecInvalid,
    ReadingsQuery,
    effective_limits,
    parse_spec,
)
from agent.storage import Store
from agent.storage.store import error_job
from agent.trust.errors import ModuleUnsupported
from agent.trust.runnable import Runnable
from agent.trust.verify import VerifiedRelease
from agent.wasm import codecache
from agent.wasm.engine import WasmEngine, shared_engine

if TYPE_CHECKING:
    from agent.runtime.scheduler import ModuleScheduler

log = get_logger("modules")

OutputSink = Callable[[ModuleOutput], Awaitable[None]]
ERROR_REPORT_EVERY_S = 300.0
TOPIC_CACHE_MAX = 10000


STATE_READ_MAX_BYTES = 64 * 1024 * 1024  # far above any state limit: only what a bug could have stored is refused


def _discard_state_job(name: str, problem: str) -> Callable[[sqlite_utils.Database], None]:
    def job(db: sqlite_utils.Database) -> None:
        db.execute("DELETE FROM module_state WHERE name = ?", (name,))
        error_job("modules", "module_state_discarded", problem)(db)
    return job


class ModuleRunFailed(ModuleError):
    """A run ended without a valid output; it is recorded in ``module_runs`` with this outcome."""

    def __init__(self, message: str, *, outcome: str, run_id: int | None) -> None:
        super().__init__(message, code=f"module_{outcome}")
        self.outcome = outcome
        self.run_id = run_id


ReadingLike = BusReading | Mapping[str, Any]


def as_reading(obj: ReadingLike) -> Reading:
    """A reading as modules see it, from the ingest's committed readings or a plain mapping (a module's
    ``Reading`` document itself, or what a caller of ``run`` hands over)."""
    if isinstance(obj, BusReading):
        return Reading(device=obj.device, metric=obj.metric, value=obj.value, wall=obj.stamp.wall, topic=obj.topic)
    return Reading(device=str(obj["device"]), metric=str(obj["metric"]), value=obj.get("value"),
                   wall=float(obj["wall"]), topic=str(obj.get("topic", "")))


class ModuleRuntime:
    def __init__(self, store: Store, settings: ModuleSettings, *, state_dir: Path,
                 engine: WasmEngine | None = None, handlers: Handlers | None = None) -> None:
        self.store = store
        self._handlers = handlers if handlers is not None else Handlers(store.rejects)
        self.settings = settings
        self.state_dir = state_dir
        self.engine = engine or shared_engine()
        self.runner = ModuleRunner(self.engine)
        self.registry = ModuleRegistry()
        self.registry.add_listener(self._on_change)
        self._sink: Handler | None = None
        self._state: dict[str, Any] = {}
        self._pending: dict[str, list[Reading]] = {}
        self._dropped: dict[str, int] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._topic_cache: dict[str, tuple[str, ...]] = {}
        self._reported: dict[tuple[str, str], float] = {}
        self._runs_since_trim = 0
        self.runs = 0
        self.failures = 0
        self.scheduler: ModuleScheduler | None = None  # set by the service; None when run without one

    # -- wiring ---------------------------------------------------------------------------------

    def set_sink(self, sink: OutputSink | None) -> None:
        """Where triggered runs' outputs go; guarded (``agent.handlers``): a sink that raises costs that
        output only, and the run itself stays recorded as it ended."""
        if self._sink is not None:
            self._handlers.remove(self._sink)
        self._sink = None if sink is None else self._handlers.add("modules", "module_output", sink)

    def reconfigure(self, settings: ModuleSettings) -> None:
        """SIGHUP: new limits apply from the next run."""
        self.settings = settings

    # -- the install-time check (a trust.runnable.RunnableCheck) ----------------------------------

    def check(self, release: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection) -> Runnable:
        """Read the run spec and instantiate the module as a run would (same linker, same limits, the start
        section under the deadline, ``_start`` not called); raise :class:`ModuleUnsupported` naming why it
        cannot run here. Blocking. On a cache miss the compiled code is returned for the release store."""
        name, version = release.name, release.version
        try:
            spec = parse_spec(release.predicate.raw)
        except ModuleSpecInvalid as exc:
            raise ModuleUnsupported(f"module {name} v{version}: the predicate does not say how to run it: "
                                    f"{exc}") from None
        try:
            module, code = codecache.lookup_or_compile(conn, self.engine, release.sha256, artifact)
        except wasmtime.WasmtimeError as exc:
            text = str(exc).strip()
            raise ModuleUnsupported(f"module {name} v{version} does not compile on this gateway: "
                                    f"{text.splitlines()[0] if text else 'error'}") from None
        deadline_s, memory, stdout = effective_limits(spec, self.settings)
        why = self.runner.check(module, Limits(deadline_s, memory, stdout))
        if why is not None:
            raise ModuleUnsupported(f"module {name} v{version} cannot run on this agent ({why.outcome}): "
                                    f"{why.error}")
        return Runnable(code, self.engine.fingerprint)

    # -- loading --------------------------------------------------------------------------------

    async def compile(self, name: str, sha256: str, wasm: bytes) -> tuple[wasmtime.Module, str, float]:
        """Compiled code for ``wasm``: precompiled from the code cache when present, else compiled (and cached)."""
        started = time.perf_counter()
        module, source = await run_blocking(self._compile_blocking, sha256, wasm)
        return module, source, (time.perf_counter() - started) * 1000

    def _compile_blocking(self, sha256: str, wasm: bytes) -> tuple[wasmtime.Module, str]:
        conn = self.store.reader()
        try:
            cached = codecache.lookup(conn, self.engine, sha256)
        finally:
            conn.close()
        if cached is not None:
            return cached, "cache"
        return codecache.load_module(self.store, self.engine, sha256, lambda: wasm), "compiled"

    async def prepare(self, name: str, version: int, sha256: str, wasm: bytes,
                      predicate: dict[str, Any]) -> LoadedModule:
        """Parse the predicate and get compiled code, without activating it (for a trial before a swap)."""
        spec = parse_spec(predicate)
        module, source, load_ms = await self.compile(name, sha256, wasm)
        return LoadedModule(name=name, version=version, sha256=sha256, module=module, spec=spec,
                            source=source, load_ms=load_ms)

    async def load_release(self, name: str, version: int, sha256: str, wasm: bytes,
                           predicate: dict[str, Any]) -> LoadedModule:
        """Parse the predicate, get compiled code, and make it the active version of ``name``."""
        current = self.registry.get(name)
        if current is not None and current.sha256 == sha256 and current.version == version:
            return current
        loaded = await self.prepare(name, version, sha256, wasm, predicate)
        await self.activate(loaded)
        return loaded

    async def activate(self, loaded: LoadedModule) -> LoadedModule | None:
        """Make a prepared version the active one of its name, between runs (waits for the run in flight);
        returns the version it replaced."""
        old = await self.registry.swap(loaded)
        log.info("module_loaded", module=loaded.name, version=loaded.version, source=loaded.source,
                 load_ms=round(loaded.load_ms, 2), trigger=loaded.spec.trigger_type)
        return old

    async def trial(self, candidate: LoadedModule, trigger: dict[str, Any] | None = None,
                    readings: Iterable[ReadingLike] | None = None) -> ModuleOutput:
        """Run a not-yet-active version once (hot-swap health check): recorded as trigger kind ``trial``,
        with the current saved state of its name, but its state is NOT saved and nothing is delivered."""
        trig = dict(trigger) if trigger is not None else make_trigger("manual", time.time())
        trig["kind"] = "trial"
        rows = [as_reading(r) for r in readings] if readings is not None else \
            await self._query_readings(candidate.spec.readings)
        return await self._run_loaded(candidate, trig, rows, None, save_state=False)

    async def unload(self, name: str) -> None:
        await self.registry.remove(name)

    def _on_change(self, name: str, old: LoadedModule | None, new: LoadedModule | None) -> None:
        self._topic_cache.clear()
        if new is None or not new.spec.topics:
            task = self._workers.pop(name, None)
            if task is not None:
                task.cancel()
            self._pending.pop(name, None)

    # -- running --------------------------------------------------------------------------------

    async def run(self, name: str, trigger: dict[str, Any] | None = None,
                  readings: Iterable[ReadingLike] | None = None) -> ModuleOutput:
        """Run ``name`` once now and return its validated output (see module docstring)."""
        trig = trigger if trigger is not None else make_trigger("manual", time.time())
        rows = [as_reading(r) for r in readings] if readings is not None else None
        return await self._run(name, trig, rows)

    async def _run(self, name: str, trigger: dict[str, Any], readings: list[Reading] | None,
                   schedule_fire: float | None = None, *, deliver: bool = False) -> ModuleOutput:
        async with self.registry.using(name) as loaded:
            if readings is None:
                readings = await self._query_readings(loaded.spec.readings)
            return await self._run_loaded(loaded, trigger, readings, schedule_fire, deliver=deliver)

    async def _run_loaded(self, loaded: LoadedModule, trigger: dict[str, Any], readings: list[Reading],
                          schedule_fire: float | None, *, save_state: bool = True,
                          deliver: bool = False) -> ModuleOutput:
        s = self.settings
        stamp = clock.now()
        deadline_s, memory, stdout_cap = effective_limits(loaded.spec, s)
        if len(readings) > s.max_readings:
            readings = readings[-s.max_readings:]
        output: ModuleOutput | None = None
        kept = 0
        try:
            raw, output, kept = await self._execute(loaded, trigger, readings, Limits(deadline_s, memory, stdout_cap))
        except Exception as exc:  # a host-side bug: still a run, and a health window must see it
            log.error("module_run_internal_error", module=loaded.name, version=loaded.version, error=str(exc),
                      error_type=type(exc).__name__)
            raw = RawRun(R.INTERNAL, f"internal error while running the module: {type(exc).__name__}: {exc}")
        recorded = self.store.writer.submit(self._record_job(
            loaded, trigger, readings=kept, stamp=stamp, raw=raw, output=output if save_state else None,
            schedule_fire=schedule_fire, summary=output.summary() if output is not None else None))
        if output is not None and deliver and self._sink is not None:
            # Hand the output on before awaiting our commit: the writer is FIFO, so whatever the sink
            # writes (its decision log) commits together with, or after, this run's row and state —
            # one fsync on the reading → actuation path instead of two. run_id is not known yet.
            await self._handlers.acall(self._sink, output)
        run_id = await asyncio.wrap_future(recorded)
        self.runs += 1
        if output is not None:
            if output.state_set and save_state:
                self._state[loaded.name] = output.state
            log.debug("module_run_ok", module=loaded.name, version=loaded.version, run_id=run_id,
                      duration_ms=round(raw.duration_ms, 2), **output.summary())
            return dataclasses.replace(output, run_id=run_id)
        self.failures += 1
        log.warning("module_run_failed", module=loaded.name, version=loaded.version, run_id=run_id,
                    outcome=raw.outcome, error=raw.error[:500], trigger=trigger.get("kind"))
        await self._report(loaded.name, raw)
        raise ModuleRunFailed(f"module '{loaded.name}' v{loaded.version} run {run_id}: {raw.error}",
                              outcome=raw.outcome, run_id=run_id)

    async def _execute(self, loaded: LoadedModule, trigger: dict[str, Any], readings: list[Reading],
                       limits: Limits) -> tuple[RawRun, ModuleOutput | None, int]:
        """Input → sandboxed run → validated output: (how it ended, the output if valid, readings given)."""
        s = self.settings
        state = await self._load_state(loaded.name)
        try:
            data, kept = build_input(trigger, readings, loaded.spec.config, state, s.input_limit_bytes)
        except ModuleError as exc:
            return RawRun(R.INPUT, str(exc)), None, 0
        except (TypeError, ValueError) as exc:
            return RawRun(R.INPUT, f"the run's input cannot be encoded as JSON: {exc}"), None, 0
        raw = await run_blocking(self.runner.execute, loaded.module, data, limits,
                                 self._permissions(loaded.name, loaded.spec))
        if not raw.ok:
            return raw, None, kept
        try:
            output = parse_output(raw.stdout, name=loaded.name, version=loaded.version, trigger=trigger,
                                  max_items=s.max_outputs, state_limit_bytes=s.state_limit_bytes)
        except ModuleOutputInvalid as exc:
            return RawRun(R.OUTPUT_INVALID, f"the module's output was rejected: {exc}", stdout_bytes=raw.stdout_bytes,
                          duration_ms=raw.duration_ms, exit_code=raw.exit_code), None, kept
        return raw, output, kept

    def _permissions(self, name: str, spec: ModuleSpec) -> Permissions:
        scratch = None
        if spec.filesystem and self.settings.allow_filesystem:
            scratch = self.state_dir / "modules" / "scratch" / name  # its own: modules never share files
        env = spec.env if self.settings.allow_env else ()
        return Permissions(scratch_dir=scratch, env=env)

    async def _report(self, name: str, raw: RawRun) -> None:
        """Put a failure into the recent-errors log for `status`, at most once per 5 min per kind."""
        key = (name, raw.outcome)
        now = time.monotonic()
        if now - self._reported.get(key, -1e9) < ERROR_REPORT_EVERY_S:
            return
        self._reported[key] = now
        await self.store.record_error("modules", f"module_{raw.outcome}", f"module '{name}': {raw.error}")

    async def _load_state(self, name: str) -> Any:
        if name not in self._state:
            state, problem = await run_blocking(self._read_state, name)
            if problem is not None:
                # saved by an older agent that let a non-finite or oversize number through: a state no run
                # can be given (its input would not encode) would fail every run for ever; start afresh
                log.error("module_state_discarded", module=name, error=problem)
                await self.store.writer.run(_discard_state_job(name, problem))
            self._state[name] = state
        return self._state[name]

    def _read_state(self, name: str) -> tuple[Any, str | None]:
        conn = self.store.reader()
        try:
            row = conn.execute("SELECT state FROM module_state WHERE name = ?", (name,)).fetchone()
        finally:
            conn.close()
        if row is None:
            return None, None
        try:
            return jsonsafe.loads(row[0], jsonsafe.Limits(STATE_READ_MAX_BYTES, max_depth=OUTPUT_MAX_DEPTH)), None
        except jsonsafe.JsonRejected as exc:
            return None, f"the saved state of module '{name}' is not valid JSON and was discarded: {exc}"

    async def _query_readings(self, query: ReadingsQuery | None) -> list[Reading]:
        if query is None:
            return []
        return await run_blocking(self._read_readings, query)

    def _read_readings(self, query: ReadingsQuery) -> list[Reading]:
        """The newest ``max`` stored readings matching the filters within ``window_s`` (oldest first)."""
        conn = self.store.reader()
        try:
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='readings'").fetchone()
            if not exists:
                return []
            cur = conn.execute("SELECT topic, device, metric, value, wall FROM readings WHERE wall >= ? "
                               "ORDER BY id DESC LIMIT ?", (time.time() - query.window_s, query.max * 20))
            out: list[Reading] = []
            for topic, device, metric, value, wall in cur:
                if any(topics.matches(f, topic) for f in query.topics):
                    out.append(Reading(device=device, metric=metric, value=value, wall=wall, topic=topic))
                    if len(out) >= query.max:
                        break
        finally:
            conn.close()
        out.reverse()
        return out

    def _record_job(self, loaded: LoadedModule, trigger: dict[str, Any], *, readings: int, stamp: clock.Stamp,
                    raw: RawRun, output: ModuleOutput | None, schedule_fire: float | None,
                    summary: dict[str, int] | None) -> Callable[[sqlite_utils.Database], int]:
        keep = self.settings.runs_kept
        self._runs_since_trim += 1
        trim = self._runs_since_trim >= 100
        if trim:
            self._runs_since_trim = 0
        outputs = json.dumps(summary) if summary is not None else ""
        state_json = None
        if output is not None and output.state_set:
            state_json = output.state_json if output.state_json is not None else jsonsafe.dumps(output.state)

        def job(db: sqlite_utils.Database) -> int:
            cur = db.execute(
                "INSERT INTO module_runs (name, version, sha256, trigger_kind, trigger, readings, started_wall,"
                " boot_id, mono, duration_ms, outcome, error, stdout_bytes, outputs)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (loaded.name, loaded.version, loaded.sha256, str(trigger.get("kind", "")),
                 json.dumps(trigger, separators=(",", ":"), default=str)[:2000], readings, stamp.wall,
                 stamp.boot_id, stamp.mono, raw.duration_ms, raw.outcome, raw.error[:2000], raw.stdout_bytes,
                 outputs))
            run_id = int(cur.lastrowid or 0)
            if state_json is not None:
                db.execute("INSERT INTO module_state (name, state, version, updated_wall) VALUES (?, ?, ?, ?)"
                           " ON CONFLICT(name) DO UPDATE SET state = excluded.state, version = excluded.version,"
                           " updated_wall = excluded.updated_wall",
                           (loaded.name, state_json, loaded.version, stamp.wall))
            if schedule_fire is not None and loaded.spec.schedule is not None:
                db.execute("INSERT INTO module_schedules (name, spec, last_run_wall, runs, updated_wall)"
                           " VALUES (?, ?, ?, 1, ?) ON CONFLICT(name) DO UPDATE SET spec = excluded.spec,"
                           " last_run_wall = excluded.last_run_wall, runs = module_schedules.runs + 1,"
                           " updated_wall = excluded.updated_wall",
                           (loaded.name, loaded.spec.schedule.key(), schedule_fire, stamp.wall))
            if trim:
                db.execute("DELETE FROM module_runs WHERE id <= ?", (run_id - keep,))
            return run_id
        return job

    async def run_triggered(self, name: str, trigger: dict[str, Any], readings: list[Reading] | None,
                            schedule_fire: float | None = None) -> ModuleOutput | None:
        """A run started by a trigger: outputs go to the sink; failures are recorded, logged and swallowed
        (a trigger must never die of a module's fault or a full disk)."""
        try:
            return await self._run(name, trigger, readings, schedule_fire, deliver=True)
        except ModuleRunFailed:
            return None
        except ModuleNotLoaded:
            log.info("module_trigger_ignored", module=name, reason="not loaded")
        except AgentError as exc:  # e.g. StorageError: the run row could not be written
            log.error("module_run_error", module=name, error=str(exc), code=exc.code)
        except Exception as exc:
            log.error("module_run_internal_error", module=name, error=str(exc), error_type=type(exc).__name__)
        return None

    # -- topic triggers -------------------------------------------------------------------------

    def _modules_for(self, topic: str) -> tuple[str, ...]:
        names = self._topic_cache.get(topic)
        if names is None:
            names = tuple(m.name for m in self.registry.all()
                          if m.spec.topics and any(topics.matches(f, topic) for f in m.spec.topics))
            if len(self._topic_cache) >= TOPIC_CACHE_MAX:
                self._topic_cache.clear()
            self._topic_cache[topic] = names
        return names

    def offer(self, readings: Iterable[ReadingLike]) -> int:
        """Hand stored readings to topic-triggered modules; returns how many (module, reading) pairs queued."""
        queued = 0
        cap = self.settings.batch_max_readings
        for obj in readings:
            topic = obj.topic if isinstance(obj, BusReading) else str(obj["topic"])
            names = self._modules_for(topic)
            if not names:
                continue
            reading = as_reading(obj)
            for name in names:
                batch = self._pending.setdefault(name, [])
                batch.append(reading)
                if len(batch) > cap:
                    del batch[0]
                    self._dropped[name] = self._dropped.get(name, 0) + 1
                queued += 1
                self._ensure_worker(name).set()
        return queued

    def _ensure_worker(self, name: str) -> asyncio.Event:
        event = self._wake.get(name)
        if event is None:
            event = self._wake[name] = asyncio.Event()
        task = self._workers.get(name)
        if task is None or task.done():
            self._workers[name] = asyncio.get_running_loop().create_task(self._topic_worker(name, event),
                                                                         name=f"module-topic-{name}")
        return event

    async def _topic_worker(self, name: str, event: asyncio.Event) -> None:
        """One per topic-triggered module: wait for readings, collect for the window, run once, repeat."""
        while True:
            await event.wait()
            loaded = self.registry.get(name)
            window_ms = self.settings.default_batch_window_ms
            if loaded is not None and loaded.spec.batch_window_ms is not None:
                window_ms = loaded.spec.batch_window_ms
            if window_ms > 0:
                await asyncio.sleep(window_ms / 1000)
            event.clear()
            batch = self._pending.pop(name, [])
            dropped = self._dropped.pop(name, 0)
            if dropped:
                log.warning("module_batch_truncated", module=name, dropped=dropped, kept=len(batch))
            if not batch:
                continue
            topics = sorted({r["topic"] for r in batch})
            trigger = make_trigger("topic", time.time(), topic=batch[-1]["topic"], topics=topics[:50],
                                   batch=len(batch), window_ms=window_ms)
            await self.run_triggered(name, trigger, batch)

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        for task in list(self._workers.values()):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers.clear()
