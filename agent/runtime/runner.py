"""One sandboxed run of a WASI command module: blocking, bounded, never raising for guest faults.

Each run gets a fresh Store (so nothing leaks between runs), an epoch deadline, a linear-memory cap,
stdin as bytes, stdout through a capped in-memory sink, stderr kept (capped) for the error message,
and no filesystem, environment or arguments unless the release declared them *and* the config
allows it (:class:`Permissions`). Whatever the guest does — trap, loop, exhaust memory, exit
non-zero, flood stdout — the result is a :class:`RawRun` with an outcome code, never an exception,
so the caller records it and carries on. Call :meth:`ModuleRunner.execute` via ``run_blocking``.
"""

from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import wasmtime

from agent.logs import get_logger
from agent.wasm import wasi_io
from agent.wasm.engine import WasmEngine
from agent.wasm.wasi_io import MemfdSink

log = get_logger("modules")

WASM_PAGE = 65536
WASI = "wasi_snapshot_preview1"
ERRNO_NOTSUP = 58  # WASI preview1 errno "not supported"
TABLE_ELEMENTS_MAX = 1 << 16  # function-pointer tables of real C modules are far smaller
STDERR_KEPT = wasi_io.STDERR_KEPT

# outcome codes (stable: stored in module_runs.outcome and reported to the fleet)
OK = "ok"
TIMEOUT = "timeout"
TRAP = "trap"
MEMORY = "memory_limit"
EXIT = "exit_nonzero"
OUTPUT_TOO_LARGE = "output_too_large"
OUTPUT_INVALID = "output_invalid"
LINK = "instantiate_failed"
INPUT = "input_invalid"
NOT_LOADED = "not_loaded"
INTERNAL = "internal_error"


@dataclass(frozen=True)
class Limits:
    deadline_s: float
    memory_bytes: int
    stdout_bytes: int


@dataclass(frozen=True)
class Permissions:
    """What a run may see besides stdin/stdout: granted = declared by the release AND allowed by config."""

    scratch_dir: Path | None = None     # preopened as "/scratch" (read-write)
    env: tuple[tuple[str, str], ...] = ()


@dataclass
class RawRun:
    outcome: str
    error: str = ""
    stdout: bytes = b""
    stdout_bytes: int = 0
    exit_code: int | None = None
    duration_ms: float = 0.0
    stderr: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == OK


class _CappedSink:
    """stdout/stderr sink that keeps at most ``cap`` bytes and fails the guest's write beyond it."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.parts: list[bytes] = []
        self.size = 0
        self.attempted = 0
        self.overflow = False

    def __call__(self, data: bytes) -> int:
        self.attempted += len(data)
        if self.size + len(data) > self.cap:
            self.overflow = True
            return -errno.EFBIG
        self.parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def value(self) -> bytes:
        return b"".join(self.parts)


class ModuleRunner:
    """Runs compiled modules on the shared engine. Thread-safe: every run has its own Store."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self._linker_lock = threading.Lock()
        self._linker: wasmtime.Linker | None = None
        # the memory-file output sink, proven with a real guest when the first runner is built (once per
        # process); None: output goes through the Python callback sink
        self.native = wasi_io.memfd_native()

    def _get_linker(self) -> wasmtime.Linker:
        with self._linker_lock:
            if self._linker is None:
                linker = wasmtime.Linker(self.engine.engine)
                linker.define_wasi()
                # A guest blocked inside a host call cannot be interrupted by the epoch deadline, and
                # poll_oneoff is WASI's way to sleep (sleep(), nanosleep()): it would let a module hold
                # an offload thread for as long as it likes. Modules get ENOTSUP instead.
                linker.allow_shadowing = True
                i32 = wasmtime.ValType.i32()
                linker.define_func(WASI, "poll_oneoff", wasmtime.FuncType([i32, i32, i32, i32], [i32]),
                                   _no_poll)
                linker.allow_shadowing = False
                self._linker = linker
            return self._linker

    def execute(self, module: wasmtime.Module, stdin: bytes, limits: Limits,
                permissions: Permissions | None = None) -> RawRun:
        """Run ``module``'s ``_start`` once. Blocking; returns a :class:`RawRun` for every guest outcome."""
        perms = permissions or Permissions()
        started = time.perf_counter()
        out: _CappedSink | MemfdSink
        err: _CappedSink | MemfdSink
        if self.native is not None:
            out, err = wasi_io.native_sinks(self.native, limits.stdout_bytes)
        else:
            out, err = _CappedSink(limits.stdout_bytes), _CappedSink(STDERR_KEPT)
        tmp: list[Path] = []
        result: RawRun
        store: wasmtime.Store | None = None
        instance: wasmtime.Instance | None = None
        try:
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["module"]
            wasi_io.set_stdin(wasi, stdin, tmp)
            if isinstance(out, MemfdSink) and isinstance(err, MemfdSink):
                out.start(limits.stdout_bytes, wasi, "stdout")
                err.start(STDERR_KEPT, wasi, "stderr")
            else:
                wasi.stdout_custom = out
                wasi.stderr_custom = err
            if perms.env:
                wasi.env = [list(kv) for kv in perms.env]
            if perms.scratch_dir is not None:
                perms.scratch_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                wasi.preopen_dir(str(perms.scratch_dir), "/scratch")
            store = self._new_store(wasi, limits)
            linked = self._link(store, module, limits)
            if isinstance(linked, RawRun):
                result = linked
                return result
            instance, start = linked
            result = self._call(store, instance, start, limits, out)
        except Exception as exc:  # a host-side bug must not take the daemon down
            log.error("module_run_internal_error", error=str(exc), error_type=type(exc).__name__)
            result = RawRun(INTERNAL, f"internal error while running the module: {type(exc).__name__}: {exc}")
        finally:
            for path in tmp:
                path.unlink(missing_ok=True)
        result.stdout_bytes = out.attempted
        result.duration_ms = (time.perf_counter() - started) * 1000
        result.stderr = err.value().decode("utf-8", errors="replace")
        if isinstance(out, MemfdSink) and isinstance(err, MemfdSink):
            out.release()
            err.release()
        if result.outcome not in (OK, OUTPUT_TOO_LARGE) and result.stderr:
            result.error += f"; stderr: {result.stderr.strip()[:300]}"
        return result

    def check(self, module: wasmtime.Module, limits: Limits) -> RawRun | None:
        """Why ``module`` cannot run here (a ``RawRun`` with outcome ``instantiate_failed``), or None.

        The install-time check: instantiated exactly as a run is (same linker, same store limits; a
        start section runs under the deadline), but ``_start`` is not called. Blocking.
        """
        try:
            linked = self._link(self._new_store(wasmtime.WasiConfig(), limits), module, limits)
        except Exception as exc:  # a host-side problem: say so rather than blame the module
            return RawRun(INTERNAL, f"internal error while checking the module: {type(exc).__name__}: {exc}")
        return linked if isinstance(linked, RawRun) else None

    def _new_store(self, wasi: wasmtime.WasiConfig, limits: Limits) -> wasmtime.Store:
        store = wasmtime.Store(self.engine.engine)
        store.set_limits(memory_size=limits.memory_bytes, table_elements=TABLE_ELEMENTS_MAX, instances=1,
                         tables=4, memories=1)
        store.set_wasi(wasi)
        store.set_epoch_deadline(self.engine.ticks_for(limits.deadline_s))
        return store

    def _link(self, store: wasmtime.Store, module: wasmtime.Module,
              limits: Limits) -> tuple[wasmtime.Instance, wasmtime.Func] | RawRun:
        """Instantiate with the WASI linker and find ``_start``; a ``RawRun`` (LINK) says why not."""
        try:
            instance = self._get_linker().instantiate(store, module)
        except (wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            return RawRun(LINK, f"the module could not be instantiated: {_first_line(exc)} (memory cap "
                                f"{limits.memory_bytes // (1024 * 1024)} MiB; only WASI preview1 imports exist)")
        start = instance.exports(store).get("_start")
        if not isinstance(start, wasmtime.Func):
            return RawRun(LINK, "the module exports no '_start' function: build it as a WASI command "
                                "(a C program with main(), or a WAT module exporting _start)")
        return instance, start

    def _call(self, store: wasmtime.Store, instance: wasmtime.Instance, start: wasmtime.Func,
              limits: Limits, out: _CappedSink | MemfdSink) -> RawRun:
        exit_code = 0
        try:
            start(store)
        except wasmtime.ExitTrap as exc:
            exit_code = exc.code
        except wasmtime.Trap as exc:
            return self._classify_trap(store, instance, exc, limits, out)
        except wasmtime.WasmtimeError as exc:
            return RawRun(TRAP, f"the module failed: {_first_line(exc)}")
        if out.overflow:
            return RawRun(OUTPUT_TOO_LARGE, f"the module wrote more than {limits.stdout_bytes} bytes on stdout "
                                            "(raise [modules].stdout_limit_bytes or fix the module)",
                          exit_code=exit_code)
        if exit_code != 0:
            mem_note = " after hitting its memory cap" if _memory_full(store, instance, limits) else ""
            return RawRun(MEMORY if mem_note else EXIT,
                          f"the module exited with status {exit_code}{mem_note}", exit_code=exit_code)
        return RawRun(OK, stdout=out.value(), exit_code=0)

    def _classify_trap(self, store: wasmtime.Store, instance: wasmtime.Instance, exc: wasmtime.Trap,
                       limits: Limits, out: _CappedSink | MemfdSink) -> RawRun:
        code = exc.trap_code
        if out.overflow:  # the root cause, even if it then ran into its deadline
            return RawRun(OUTPUT_TOO_LARGE, f"the module wrote more than {limits.stdout_bytes} bytes on stdout "
                                            "and was stopped")
        if code == wasmtime.TrapCode.INTERRUPT:
            return RawRun(TIMEOUT, f"the module ran longer than its {limits.deadline_s * 1000:.0f} ms deadline "
                                   "and was stopped")
        name = code.name.lower() if code is not None else "trap"
        if _memory_full(store, instance, limits):
            return RawRun(MEMORY, f"the module trapped ({name}) after growing its memory to the "
                                  f"{limits.memory_bytes // (1024 * 1024)} MiB cap")
        return RawRun(TRAP, f"the module trapped: {name}: {_first_line(exc)}")


def _memory_full(store: wasmtime.Store, instance: wasmtime.Instance, limits: Limits) -> bool:
    """Whether the guest's memory reached the cap, give or take its last growth step (a bomb's end).

    wasmtime-py exposes no resource-limiter callback, so a failed ``memory.grow`` is inferred from
    the memory size: above 7/8 of the cap (growth steps are usually well below 1/8 of it).
    """
    try:
        mem = instance.exports(store).get("memory")
        if isinstance(mem, wasmtime.Memory):
            return mem.size(store) * WASM_PAGE > limits.memory_bytes * 7 // 8
    except (wasmtime.WasmtimeError, wasmtime.Trap):
        return False
    return False


def _no_poll(_in: int, _out: int, _n: int, _nevents: int) -> int:
    return ERRNO_NOTSUP


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
