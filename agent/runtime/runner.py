"""One sandboxed run of a WASI command module: blocking, bounded, never raising for guest faults.

Each run gets a fresh Store (so nothing leaks between runs), an epoch deadline, a linear-memory cap,
stdin as bytes, stdout through a capped in-memory sink, stderr kept (capped) for the error message,
and no filesystem, environment or arguments unless the release declared them *and* the config
allows it (:class:`Permissions`). Whatever the guest does — trap, loop, exhaust memory, exit
non-zero, flood stdout — the result is a :class:`RawRun` with an outcome code, never an exception,
so the caller records it and carries on. Call :meth:`ModuleRunner.execute` via ``run_blocking``.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime

from agent.logs import get_logger
from agent.wasm.engine import WasmEngine

log = get_logger("modules")

WASM_PAGE = 65536
WASI = "wasi_snapshot_preview1"
ERRNO_NOTSUP = 58  # WASI preview1 errno "not supported"
TABLE_ELEMENTS_MAX = 1 << 16  # function-pointer tables of real C modules are far smaller
STDERR_KEPT = 2048

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


class _MemfdSink:
    """stdout/stderr as an anonymous memory file that wasmtime's WASI thread fills with libc ``write``.

    Why: a Python callback sink (``stdout_custom``) makes wasmtime's I/O thread take the GIL for every
    guest write, queueing behind the event loop (measured: a thermostat run writes 3 times; the run's
    wall time under load dropped ~15 % without the callbacks). Here no guest write touches Python.

    The cap: the file is ``cap + 1 + SLACK`` bytes and sealed against growing (F_SEAL_GROW), so a write
    past its end fails (the guest gets an I/O error, as with the callback sink) and memory stays
    bounded. The kernel refuses at most the one chunk (≤ a huge page ≤ SLACK) that crosses the end,
    so whenever a write was refused more than ``cap`` bytes were written: ``overflow`` is exact.
    One pair per thread, reused run after run (runs on one thread never overlap); the offset is reset
    per run and only the bytes this run wrote are read; a big output's pages are punched out after.
    """

    SLACK = 4 << 20
    KEEP = 256 * 1024  # pages kept resident between runs; larger outputs are released after the run

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("edge-agent-module-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(self.fd)
            raise
        self.cap = 0

    def __del__(self) -> None:  # the thread that owned it has ended: no run can write to it any more
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            with contextlib.suppress(Exception):  # also at interpreter shutdown
                os.close(fd)

    def start(self, cap: int, wasi: wasmtime.WasiConfig, stream: str) -> None:
        self.cap = cap
        if _LSEEK(self.fd, 0, os.SEEK_SET) != 0:
            raise OSError(ctypes.get_errno(), "lseek on the module output file failed")
        setter = _SET_STDOUT if stream == "stdout" else _SET_STDERR
        setter(wasi.ptr(), _WRITE, self.fd, _NO_FINALIZER)

    @property
    def attempted(self) -> int:
        """Bytes the guest wrote (when it overflowed: more than ``cap``, fewer than it tried)."""
        return max(0, int(_LSEEK(self.fd, 0, os.SEEK_CUR)))

    @property
    def overflow(self) -> bool:
        return self.attempted > self.cap

    def value(self) -> bytes:
        n = min(self.attempted, self.cap)
        if n == 0:
            return b""
        buf = ctypes.create_string_buffer(n)
        got = _PREAD(self.fd, buf, n, 0)
        if got != n:
            raise OSError(ctypes.get_errno(), f"reading the module output file gave {got} of {n} bytes")
        return buf.raw

    def release(self) -> None:
        """After a run: give back the pages of a big output (the file keeps its size and seals)."""
        if self.attempted > self.KEEP:
            _FALLOCATE(self.fd, _PUNCH_HOLE, 0, self.size)


class _MemfdSinks(threading.local):
    out: _MemfdSink | None = None
    err: _MemfdSink | None = None


_memfd_sinks = _MemfdSinks()


def _native_sinks(stdout_cap: int) -> tuple[_MemfdSink, _MemfdSink] | None:
    """This thread's (stdout, stderr) memory files, sized for ``stdout_cap``; None where unsupported."""
    if not MEMFD_OUTPUT:
        return None
    local = _memfd_sinks
    if local.out is None or local.out.size < stdout_cap + 1 + _MemfdSink.SLACK:
        local.out = _MemfdSink(stdout_cap + 1 + _MemfdSink.SLACK)
    if local.err is None:
        local.err = _MemfdSink(STDERR_KEPT + 1 + _MemfdSink.SLACK)
    return local.out, local.err


def _memfd_output_available() -> bool:
    try:
        from wasmtime import _ffi

        global _SET_STDOUT, _SET_STDERR, _WRITE, _NO_FINALIZER, _LSEEK, _PREAD, _FALLOCATE
        libc = ctypes.CDLL(None, use_errno=True)

        def _addr(fn: Any) -> int:
            value = ctypes.cast(fn, ctypes.c_void_p).value
            if value is None:
                raise AttributeError("null function pointer")
            return int(value)

        callback = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte),
                                    ctypes.c_size_t)
        # libc write(fd, buf, n) has the callback's shape (data, buf, n) -> ssize_t when data is the fd
        # (64-bit ABIs pass both in the first integer register); it returns -1 on error, which
        # wasmtime reports to the guest as a failed write
        _WRITE = callback(_addr(libc.write))
        _NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()
        _SET_STDOUT = _ffi.wasi_config_set_stdout_custom
        _SET_STDERR = _ffi.wasi_config_set_stderr_custom
        # these keep the GIL (PYFUNCTYPE): a syscall of a few µs is cheaper than queueing to retake it
        _LSEEK = ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int)(
            _addr(libc.lseek))
        _PREAD = ctypes.PYFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
                                   ctypes.c_int64)(_addr(libc.pread))
        _FALLOCATE = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)(
            _addr(libc.fallocate))
        _check_memfd_output()
    except (ImportError, AttributeError, OSError, wasmtime.WasmtimeError, wasmtime.Trap) as exc:
        log.info("module_output_callback_sink", reason=f"{type(exc).__name__}: {exc}")
        return False
    return True


# a WASI guest that writes "memfd-ok" + "!" to stdout in two calls: the start-up proof of the memfd sink
_CHECK_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "memfd-ok!")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 32)) (i32.store (i32.const 4) (i32.const 8))
    (i32.store (i32.const 8) (i32.const 40)) (i32.store (i32.const 12) (i32.const 1))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
    (drop (call $write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))))"""


def _check_memfd_output() -> None:
    """Run a real guest through the memfd sink once per process (a private engine, ~10 ms) and
    compare the bytes, including the cap: the ABI trick above must be proven on this machine
    (x86-64 and ARM64 alike) before any module's output depends on it."""
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module(engine, _CHECK_WAT)
    for cap, expect, overflow in ((9, b"memfd-ok!", False), (8, b"memfd-ok", True)):
        sink = _MemfdSink(cap + 1 + _MemfdSink.SLACK)
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        sink.start(cap, wasi, "stdout")
        store.set_wasi(wasi)
        start = linker.instantiate(store, module).exports(store)["_start"]
        assert isinstance(start, wasmtime.Func)
        start(store)
        got = (sink.value(), sink.overflow)
        del sink
        if got != (expect, overflow):
            raise OSError(errno.EIO, f"the memfd output sink gave {got!r}, expected {(expect, overflow)!r}")


_PUNCH_HOLE = 0x03  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
_SET_STDOUT: Any = None
_SET_STDERR: Any = None
_WRITE: Any = None
_NO_FINALIZER: Any = None
_LSEEK: Any = None
_PREAD: Any = None
_FALLOCATE: Any = None
MEMFD_OUTPUT = (sys.platform == "linux" and ctypes.sizeof(ctypes.c_void_p) == 8 and hasattr(os, "memfd_create")
                and _memfd_output_available())


def _set_stdin(wasi: wasmtime.WasiConfig, data: bytes, tmp: list[Path]) -> None:
    """Hand ``data`` to the guest's stdin: the C API's bytes call if present, else a temp file.

    wasmtime-py 50 has no public bytes-stdin; the C function takes ownership of the vector.
    """
    from wasmtime import _ffi as ffi

    setter = getattr(ffi, "wasi_config_set_stdin_bytes", None)
    if setter is not None:
        vec = ffi.wasm_byte_vec_t()
        buf = ctypes.create_string_buffer(data, len(data))
        ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte)))
        setter(wasi.ptr(), ctypes.byref(vec))
        return
    fd, name = tempfile.mkstemp(prefix="ea-stdin-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.append(Path(name))
    wasi.stdin_file = name


class ModuleRunner:
    """Runs compiled modules on the shared engine. Thread-safe: every run has its own Store."""

    def __init__(self, engine: WasmEngine) -> None:
        self.engine = engine
        self._linker_lock = threading.Lock()
        self._linker: wasmtime.Linker | None = None

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
        out: _CappedSink | _MemfdSink
        err: _CappedSink | _MemfdSink
        native = _native_sinks(limits.stdout_bytes)
        if native is not None:
            out, err = native
        else:
            out, err = _CappedSink(limits.stdout_bytes), _CappedSink(STDERR_KEPT)
        tmp: list[Path] = []
        result: RawRun
        store: wasmtime.Store | None = None
        instance: wasmtime.Instance | None = None
        try:
            wasi = wasmtime.WasiConfig()
            wasi.argv = ["module"]
            _set_stdin(wasi, stdin, tmp)
            if isinstance(out, _MemfdSink) and isinstance(err, _MemfdSink):
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
        if isinstance(out, _MemfdSink) and isinstance(err, _MemfdSink):
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
              limits: Limits, out: _CappedSink | _MemfdSink) -> RawRun:
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
                       limits: Limits, out: _CappedSink | _MemfdSink) -> RawRun:
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
