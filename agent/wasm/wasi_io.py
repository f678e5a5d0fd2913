"""WASI stdin and stdout of a module run without Python in the I/O path: two wasmtime-py shims.

- **stdin as bytes.** wasmtime-py 50 has no public way to hand a guest its stdin as bytes; the C API
  has ``wasi_config_set_stdin_bytes`` (it takes ownership of the byte vector), reached through
  ``wasmtime._ffi``. Fallback: a temporary file as ``stdin_file``.
- **stdout/stderr as memory files.** A Python callback sink (``stdout_custom``) makes wasmtime's I/O
  thread take the GIL for every guest write, queueing behind the event loop (measured: a thermostat
  run writes 3 times; the run's wall time under load dropped ~15 % without the callbacks). With
  ``wasi_config_set_stdout_custom`` (``wasmtime._ffi``) libc ``write`` itself is the callback, on a
  sealed anonymous memory file (:class:`MemfdSink`). Fallback: the callback sink.

Both use internals only under the pinned wasmtime-py (:mod:`agent.wasm.pinned`), are resolved on first
use — the memory-file sink is proven with a real guest when the first module runner is built, never
at import — and log ``wasm_shim_fallback`` once when they are not used.
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import wasmtime

from agent.wasm import pinned

STDERR_KEPT = 2048
_PUNCH_HOLE = 0x03  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


def _addr(fn: Any) -> int:
    value = ctypes.cast(fn, ctypes.c_void_p).value
    if value is None:
        raise AttributeError("null function pointer")
    return int(value)


# --------------------------------------------------------------------------------------------- stdin

@cache
def stdin_bytes_setter() -> Any:
    """``(wasi, data)`` → the guest's stdin is ``data``; None (logged once) where the C call is not used."""
    problem = pinned.wasmtime_problem()
    if problem is None:
        try:
            from wasmtime import _ffi

            setter = _ffi.wasi_config_set_stdin_bytes
            byte_vec, vec_new = _ffi.wasm_byte_vec_t, _ffi.wasm_byte_vec_new

            def set_bytes(wasi: wasmtime.WasiConfig, data: bytes) -> None:
                vec = byte_vec()
                buf = ctypes.create_string_buffer(data, len(data))
                vec_new(ctypes.byref(vec), len(data), ctypes.cast(buf, ctypes.POINTER(ctypes.c_ubyte)))
                setter(wasi.ptr(), ctypes.byref(vec))  # the C side takes ownership of the vector
            return set_bytes
        except (ImportError, AttributeError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    pinned.fallback("stdin_bytes", problem, instead="each run's stdin goes through a temporary file")
    return None


def set_stdin(wasi: wasmtime.WasiConfig, data: bytes, tmp: list[Path]) -> None:
    """Hand ``data`` to the guest's stdin: the C API's bytes call, else a temp file (appended to ``tmp``
    for the caller to delete after the run)."""
    set_bytes = stdin_bytes_setter()
    if set_bytes is not None:
        set_bytes(wasi, data)
        return
    fd, name = tempfile.mkstemp(prefix="ea-stdin-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    tmp.append(Path(name))
    wasi.stdin_file = name


# ----------------------------------------------------------------------------------- stdout, stderr

@dataclass(frozen=True)
class _Native:
    """The C calls the memory-file sink uses (wasmtime-py internals and libc), resolved once."""

    set_stdout: Any
    set_stderr: Any
    write: Any
    no_finalizer: Any
    lseek: Any
    pread: Any
    fallocate: Any


def _resolve() -> _Native:
    from wasmtime import _ffi

    libc = ctypes.CDLL(None, use_errno=True)
    callback = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_void_p, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t)
    return _Native(
        set_stdout=_ffi.wasi_config_set_stdout_custom,
        set_stderr=_ffi.wasi_config_set_stderr_custom,
        # libc write(fd, buf, n) has the callback's shape (data, buf, n) -> ssize_t when data is the fd
        # (64-bit ABIs pass both in the first integer register); it returns -1 on error, which
        # wasmtime reports to the guest as a failed write
        write=callback(_addr(libc.write)),
        no_finalizer=ctypes.CFUNCTYPE(None, ctypes.c_void_p)(),
        # these keep the GIL (PYFUNCTYPE): a syscall of a few µs is cheaper than queueing to retake it
        lseek=ctypes.PYFUNCTYPE(ctypes.c_int64, ctypes.c_int, ctypes.c_int64, ctypes.c_int)(_addr(libc.lseek)),
        pread=ctypes.PYFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t,
                                ctypes.c_int64)(_addr(libc.pread)),
        fallocate=ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)(
            _addr(libc.fallocate)),
    )


class MemfdSink:
    """stdout/stderr as an anonymous memory file that wasmtime's WASI thread fills with libc ``write``.

    The cap: the file is ``cap + 1 + SLACK`` bytes and sealed against growing (F_SEAL_GROW), so a write
    past its end fails (the guest gets an I/O error, as with the callback sink) and memory stays
    bounded. The kernel refuses at most the one chunk (≤ a huge page ≤ SLACK) that crosses the end,
    so whenever a write was refused more than ``cap`` bytes were written: ``overflow`` is exact.
    One pair per thread, reused run after run (runs on one thread never overlap); the offset is reset
    per run and only the bytes this run wrote are read; a big output's pages are punched out after.
    """

    SLACK = 4 << 20
    KEEP = 256 * 1024  # pages kept resident between runs; larger outputs are released after the run

    def __init__(self, size: int, native: _Native) -> None:
        self.size = size
        self.native = native
        self.fd = os.memfd_create("edge-agent-module-output", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except OSError:
            os.close(self.fd)
            raise
        self.cap = 0

    def __del__(self) -> None:  # the thread that owned it has ended: no run can write to it any more
        fd, self.fd = self.__dict__.get("fd", -1), -1
        if fd >= 0:
            with contextlib.suppress(Exception):  # also at interpreter shutdown
                os.close(fd)

    def start(self, cap: int, wasi: wasmtime.WasiConfig, stream: str) -> None:
        self.cap = cap
        if self.native.lseek(self.fd, 0, os.SEEK_SET) != 0:
            raise OSError(ctypes.get_errno(), "lseek on the module output file failed")
        setter = self.native.set_stdout if stream == "stdout" else self.native.set_stderr
        setter(wasi.ptr(), self.native.write, self.fd, self.native.no_finalizer)

    @property
    def attempted(self) -> int:
        """Bytes the guest wrote (when it overflowed: more than ``cap``, fewer than it tried)."""
        return max(0, int(self.native.lseek(self.fd, 0, os.SEEK_CUR)))

    @property
    def overflow(self) -> bool:
        return self.attempted > self.cap

    def value(self) -> bytes:
        n = min(self.attempted, self.cap)
        if n == 0:
            return b""
        buf = ctypes.create_string_buffer(n)
        got = self.native.pread(self.fd, buf, n, 0)
        if got != n:
            raise OSError(ctypes.get_errno(), f"reading the module output file gave {got} of {n} bytes")
        return buf.raw

    def release(self) -> None:
        """After a run: give back the pages of a big output (the file keeps its size and seals)."""
        if self.attempted > self.KEEP:
            self.native.fallocate(self.fd, _PUNCH_HOLE, 0, self.size)


# a WASI guest that writes "memfd-ok" + "!" to stdout in two calls: the proof of the memory-file sink
_CHECK_WAT = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 32) "memfd-ok!")
  (func (export "_start")
    (i32.store (i32.const 0) (i32.const 32)) (i32.store (i32.const 4) (i32.const 8))
    (i32.store (i32.const 8) (i32.const 40)) (i32.store (i32.const 12) (i32.const 1))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 16)))
    (drop (call $write (i32.const 1) (i32.const 8) (i32.const 1) (i32.const 16)))))"""


def _prove(native: _Native) -> None:
    """Run a real guest through the sink (a private engine, ~10 ms) and compare the bytes, including the
    cap: the ABI trick above must be proven on this machine (x86-64 and ARM64 alike) before any
    module's output depends on it."""
    engine = wasmtime.Engine()
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    module = wasmtime.Module(engine, _CHECK_WAT)
    for cap, expect, overflow in ((9, b"memfd-ok!", False), (8, b"memfd-ok", True)):
        sink = MemfdSink(cap + 1 + MemfdSink.SLACK, native)
        store = wasmtime.Store(engine)
        wasi = wasmtime.WasiConfig()
        sink.start(cap, wasi, "stdout")
        store.set_wasi(wasi)
        start = linker.instantiate(store, module).exports(store)["_start"]
        if not isinstance(start, wasmtime.Func):
            raise OSError(errno.EIO, "the memfd proof module has no _start function")
        start(store)
        got = (sink.value(), sink.overflow)
        del sink
        if got != (expect, overflow):
            raise OSError(errno.EIO, f"the memfd output sink gave {got!r}, expected {(expect, overflow)!r}")


@cache
def memfd_native() -> _Native | None:
    """The memory-file sink's calls, proven on this machine; None (logged once) where it is not used."""
    if not (sys.platform == "linux" and ctypes.sizeof(ctypes.c_void_p) == 8 and hasattr(os, "memfd_create")):
        problem: str | None = "needs 64-bit Linux with memfd_create"
    else:
        problem = pinned.wasmtime_problem()
    if problem is None:
        try:
            native = _resolve()
            _prove(native)
            return native
        except (ImportError, AttributeError, OSError, wasmtime.WasmtimeError, wasmtime.Trap) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    pinned.fallback("memfd_output", problem, instead="module output goes through a Python callback sink")
    return None


class _ThreadSinks(threading.local):
    out: MemfdSink | None = None
    err: MemfdSink | None = None


_thread_sinks = _ThreadSinks()


def native_sinks(native: _Native, stdout_cap: int) -> tuple[MemfdSink, MemfdSink]:
    """This thread's (stdout, stderr) memory files, sized for ``stdout_cap``."""
    local = _thread_sinks
    if local.out is None or local.out.size < stdout_cap + 1 + MemfdSink.SLACK:
        local.out = MemfdSink(stdout_cap + 1 + MemfdSink.SLACK, native)
    if local.err is None:
        local.err = MemfdSink(STDERR_KEPT + 1 + MemfdSink.SLACK, native)
    return local.out, local.err
