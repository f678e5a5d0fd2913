"""Guest-call adapters: the fast private wasmtime-py path and the public fallback.

Why: ``Func.__call__`` rebuilds the function type and boxes every argument (13–100 µs per call on
the gateway), which alone would blow the 70 µs p99 budget. :class:`FastCalls` pre-binds each export
and calls ``wasmtime_func_call_unchecked`` with one preallocated raw-value buffer; memory is read
with ``ctypes.string_at`` after a bounded NUL scan. Both use private wasmtime-py internals, pinned
at wasmtime==50.0.1; :class:`PublicCalls` does the same job through the public API and is selected
by ``[policy] fast_calls = false`` or automatically when the internals are missing. The memory
base pointer is re-read after every guest call (the guest may grow memory and move it).
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Protocol

import wasmtime

from agent.logs import get_logger

log = get_logger("policy")


def _addr(fn: Any) -> int:
    """The C address of a ctypes function (to rebind it with a leaner prototype)."""
    value = ctypes.cast(fn, ctypes.c_void_p).value
    if value is None:
        raise AttributeError("null function pointer")
    return int(value)


try:  # private internals of wasmtime-py 50.0.1 (pinned in pyproject.toml)
    from wasmtime import _bindings as _b
    from wasmtime import _ffi
    from wasmtime._func import maybe_raise_last_exn as _raise_last_exn

    _CALL_UNCHECKED = _b._wasmtime_func_call_unchecked
    _DLL: Any = _b.dll  # type: ignore[attr-defined]
    _MEM_DATA = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        _addr(_DLL.wasmtime_memory_data))
    _MEM_SIZE = ctypes.PYFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)(
        _addr(_DLL.wasmtime_memory_data_size))
    _SET_DEADLINE = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
        _addr(_DLL.wasmtime_context_set_epoch_deadline))
    _TRAP_PTR = ctypes.POINTER(_ffi.wasm_trap_t)
    if ctypes.sizeof(_ffi.wasmtime_val_raw_t) != 16:  # the engine packs opa_eval's args at 16-byte strides
        raise AttributeError("wasmtime_val_raw_t is not 16 bytes in this wasmtime-py")
    FAST_AVAILABLE = True
except (ImportError, AttributeError) as _exc:  # pragma: no cover - only with another wasmtime version
    FAST_AVAILABLE = False
    _MEM_DATA = _MEM_SIZE = _SET_DEADLINE = None  # type: ignore[assignment]
    log.warning("policy_fast_calls_unavailable", error=str(_exc))

_LIBC = ctypes.CDLL(None)
_MEMCHR = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)(
    _addr(_LIBC.memchr))
_string_at = ctypes.string_at
_unpack_i32 = struct.Struct("<I").unpack_from  # unsigned: addresses
# ctypes.memmove is a CFUNCTYPE: it drops and retakes the GIL around a copy of a few hundred bytes, and
# under load retaking it means queueing behind the writer / module threads (measured: the input copy
# cost as much loop time as the whole guest call). Copies this small never need to release the GIL.
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    _addr(ctypes.memmove))


class OutputTooLarge(Exception):
    """A NUL-terminated string from the guest is longer than the cap (or has no NUL in memory)."""


class Calls(Protocol):
    """What the engine needs from the guest: call an export with i32 args, read/write memory."""

    def call(self, name: str, *args: int) -> int: ...
    def set_deadline(self, ticks: int) -> None: ...
    def write(self, addr: int, data: bytes) -> None: ...
    def read_cstr(self, addr: int, limit: int) -> bytes: ...
    def mem_size(self) -> int: ...


class PublicCalls:
    """Public wasmtime-py API only: slow (~15–100 µs per call) but version-proof."""

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory, funcs: dict[str, wasmtime.Func]) -> None:
        self.store = store
        self.memory = memory
        self.funcs = funcs

    def call(self, name: str, *args: int) -> int:
        result: Any = self.funcs[name](self.store, *args)
        return (int(result) & 0xFFFFFFFF) if result is not None else 0

    def set_deadline(self, ticks: int) -> None:
        self.store.set_epoch_deadline(ticks)

    def mem_size(self) -> int:
        return int(self.memory.data_len(self.store))

    def write(self, addr: int, data: bytes) -> None:
        self.memory.write(self.store, data, addr)

    def read_cstr(self, addr: int, limit: int) -> bytes:
        size = self.mem_size()
        if addr <= 0 or addr >= size:
            raise OutputTooLarge(f"string address {addr} is outside guest memory ({size} bytes)")
        stop = min(size, addr + limit + 1)
        chunk = 4096
        pos = addr
        while pos < stop:
            end = min(stop, pos + chunk)
            block = self.memory.read(self.store, pos, end)
            nul = block.find(b"\0")
            if nul >= 0:
                return bytes(self.memory.read(self.store, addr, pos + nul))
            pos = end
            chunk *= 4
        raise OutputTooLarge(f"string at {addr} is longer than {limit} bytes or not terminated")


class FastCalls:
    """Private fast path: unchecked calls with a preallocated raw buffer, ctypes memory access.

    One instance per Store; not thread-safe (neither is the Store). Nested calls (from a builtin
    callback while ``opa_eval`` runs) use their own buffer, so the outer call's results survive.
    """

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory, funcs: dict[str, wasmtime.Func]) -> None:
        self.store = store
        self.ctx = store._context()
        self.ctx_addr = ctypes.cast(self.ctx, ctypes.c_void_p).value
        self.mem_ref = ctypes.byref(memory._memory)
        self.mem_addr = ctypes.addressof(memory._memory)
        self.refs = {name: ctypes.byref(f._func) for name, f in funcs.items()}
        self._bufs = [(_ffi.wasmtime_val_raw_t * 8)() for _ in range(4)]
        self._depth = 0
        self.trap = _TRAP_PTR()
        self.trap_ref = ctypes.byref(self.trap)

    def _fail(self, err: Any) -> None:
        trap = self.trap
        self.trap = _TRAP_PTR()
        self.trap_ref = ctypes.byref(self.trap)
        if err:
            error = wasmtime.WasmtimeError._from_ptr(err)
            _raise_last_exn()
            raise error
        exc = wasmtime.Trap._from_ptr(trap)
        _raise_last_exn()
        raise exc

    def call(self, name: str, *args: int) -> int:
        depth = self._depth
        if depth >= len(self._bufs):
            raise RecursionError("guest calls nested too deeply")
        buf = self._bufs[depth]
        for i, arg in enumerate(args):
            buf[i].i32 = arg
        self._depth = depth + 1
        try:
            err = _CALL_UNCHECKED(self.ctx, self.refs[name], buf, 8, self.trap_ref)
        finally:
            self._depth = depth
        if err or self.trap:
            self._fail(err)
        return int(buf[0].i32) & 0xFFFFFFFF  # addresses are unsigned

    def call_ref(self, ref: Any, buf: Any) -> int:
        """The hot path: arguments already in ``buf`` (a top-level buffer from :meth:`buffer`)."""
        self._depth = 1
        try:
            err = _CALL_UNCHECKED(self.ctx, ref, buf, 8, self.trap_ref)
        finally:
            self._depth = 0
        if err or self.trap:
            self._fail(err)
        return int(_unpack_i32(buf)[0])

    def buffer(self) -> Any:
        return self._bufs[0]

    def set_deadline(self, ticks: int) -> None:
        _SET_DEADLINE(self.ctx_addr, ticks)

    def base(self) -> int:
        return int(_MEM_DATA(self.ctx_addr, self.mem_addr) or 0)

    def mem_size(self) -> int:
        return int(_MEM_SIZE(self.ctx_addr, self.mem_addr))

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > self.mem_size():
            raise IndexError("write outside guest memory")
        _memmove(self.base() + addr, data, len(data))

    def read_cstr(self, addr: int, limit: int) -> bytes:
        size = _MEM_SIZE(self.ctx_addr, self.mem_addr)
        if addr <= 0 or addr >= size:
            raise OutputTooLarge(f"string address {addr} is outside guest memory ({size} bytes)")
        start = _MEM_DATA(self.ctx_addr, self.mem_addr) + addr
        span = min(size - addr, limit + 1)
        end = _MEMCHR(start, 0, span)
        if not end:
            raise OutputTooLarge(f"string at {addr} is longer than {limit} bytes or not terminated")
        return _string_at(start, end - start)


def make_calls(fast: bool, store: wasmtime.Store, memory: wasmtime.Memory,
               funcs: dict[str, wasmtime.Func]) -> FastCalls | PublicCalls:
    if fast and FAST_AVAILABLE:
        return FastCalls(store, memory, funcs)
    return PublicCalls(store, memory, funcs)
