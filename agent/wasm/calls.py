"""Guest-call adapters: the fast private wasmtime-py path and the public fallback.

Why: ``Func.__call__`` rebuilds the function type and boxes every argument (13–100 µs per call on
the gateway), which alone would blow the 70 µs p99 budget. :class:`FastCalls` pre-binds each export
and calls ``wasmtime_func_call_unchecked`` with one preallocated raw-value buffer; memory is read
with ``ctypes.string_at`` after a bounded NUL scan. Both use private wasmtime-py internals, pinned
at wasmtime==50.0.1; :class:`PublicCalls` does the same job through the public API and is selected
by ``[policy] fast_calls = false`` or automatically when the internals are missing. The memory
base pointer is re-read after every guest call (the guest may grow memory and move it).

Host-function failures: wasmtime-py parks an exception raised by a host function in ONE
process-global slot (``wasmtime._func.LAST_EXCEPTION``) and re-raises it after the call traps, so
two threads failing at once could swap or lose each other's errors. The engine therefore keeps the
real exception on the failing instance, and both adapters hand every failed guest call to
``on_fail(exc)``, which returns that instance's own exception (or ``exc`` itself).
* Fast path: the host functions themselves are raw callbacks (:func:`define_host_func`, also
  private API) that record the exception and return a trap, so the global slot is never touched
  (and a builtin call skips the trampoline's Caller and value boxing: ~8 µs less per builtin here).
* Public fallback: host functions go through wasmtime-py's trampoline with a bare marker exception;
  :func:`forget_host_exception` clears the slot when it still holds our marker, so no stale
  exception is left for another wasmtime user (the module runner) to pick up.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
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

    _CALL_UNCHECKED = _b._wasmtime_func_call_unchecked
    _DLL: Any = _b.dll  # type: ignore[attr-defined]
    _MEM_DATA = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
        _addr(_DLL.wasmtime_memory_data))
    _MEM_SIZE = ctypes.PYFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)(
        _addr(_DLL.wasmtime_memory_data_size))
    _SET_DEADLINE = ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
        _addr(_DLL.wasmtime_context_set_epoch_deadline))
    _TRAP_PTR = ctypes.POINTER(_ffi.wasm_trap_t)
    _RAW_CALLBACK = _b.wasmtime_func_unchecked_callback_t
    _DEFINE_RAW = _b.wasmtime_linker_define_func_unchecked
    _NO_FINALIZER = _b._wasmtime_linker_define_func_unchecked.argtypes[8]()  # a NULL function pointer
    _TRAP_NEW = _b.wasmtime_trap_new
    if ctypes.sizeof(_ffi.wasmtime_val_raw_t) != 16:  # the engine packs opa_eval's args at 16-byte strides
        raise AttributeError("wasmtime_val_raw_t is not 16 bytes in this wasmtime-py")
    FAST_AVAILABLE = True
except (ImportError, AttributeError) as _exc:  # pragma: no cover - only with another wasmtime version
    FAST_AVAILABLE = False
    _MEM_DATA = _MEM_SIZE = _SET_DEADLINE = None  # type: ignore[assignment]
    log.warning("policy_fast_calls_unavailable", error=str(_exc))

try:  # wasmtime-py's one process-global slot for a host function's exception
    from wasmtime import _func as _wt_func
    _HAS_LAST_EXCEPTION = hasattr(_wt_func, "LAST_EXCEPTION")
except ImportError:  # pragma: no cover - only with another wasmtime version
    _HAS_LAST_EXCEPTION = False


def forget_host_exception(exc: BaseException | None) -> None:
    """Clear wasmtime-py's global host-exception slot if it still holds ``exc`` (ours), else leave it."""
    if exc is not None and _HAS_LAST_EXCEPTION and _wt_func.LAST_EXCEPTION is exc:
        _wt_func.LAST_EXCEPTION = None


def _same(exc: BaseException) -> BaseException:
    return exc


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

    on_fail: Callable[[BaseException], BaseException]

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
        self.on_fail: Callable[[BaseException], BaseException] = _same

    def call(self, name: str, *args: int) -> int:
        try:
            result: Any = self.funcs[name](self.store, *args)
        except Exception as exc:  # what surfaced may be another thread's exception (wasmtime's global)
            raise self.on_fail(exc)  # noqa: B904 - the cause is chained as __context__
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
        self.on_fail: Callable[[BaseException], BaseException] = _same

    def _fail(self, err: Any) -> None:
        """Raise the failed call's cause: the instance's own host exception, else the trap/error.
        wasmtime-py's global slot is deliberately not read (another thread may own what it holds)."""
        trap = self.trap
        self.trap = _TRAP_PTR()
        self.trap_ref = ctypes.byref(self.trap)
        exc: BaseException = wasmtime.WasmtimeError._from_ptr(err) if err else wasmtime.Trap._from_ptr(trap)
        raise self.on_fail(exc)

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


_HOST_TRAP_MSG = b"host function failed (the error is kept on the policy instance)"


def define_host_func(linker: wasmtime.Linker, name: str, *, params: int, results: int,
                     fn: Callable[..., int | None], failed: Callable[[BaseException], None],
                     keep: list[Any]) -> None:
    """Define ``env.<name>`` (i32 params, 0 or 1 i32 result) bypassing wasmtime-py's trampoline.

    Why: the trampoline parks a host function's exception in wasmtime-py's ONE process-global slot
    (and builds a Caller and boxes every value, several µs per call). This raw callback hands the
    exception to ``failed`` (which keeps it on the instance) and returns a fresh trap itself, so the
    global is never touched. ``keep`` must outlive the linker's instances (it holds the callback).
    """
    def host(_env: Any, _caller: Any, raw: Any, _n: int) -> int:
        try:
            result = fn(*[raw[i].i32 for i in range(params)])
            if results:
                raw[0].i32 = result
            return 0
        except BaseException as exc:  # never let an exception escape into C (``failed`` must not raise)
            failed(exc)
            trap = _TRAP_NEW(_HOST_TRAP_MSG, len(_HOST_TRAP_MSG))
            return int(ctypes.cast(trap, ctypes.c_void_p).value or 0)

    callback = _RAW_CALLBACK(host)
    ty = wasmtime.FuncType([wasmtime.ValType.i32()] * params, [wasmtime.ValType.i32()] * results)
    keep.extend((callback, ty))
    module, fname = b"env", name.encode()
    err = _DEFINE_RAW(linker.ptr(), module, len(module), fname, len(fname), ty.ptr(), callback, None, _NO_FINALIZER)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)


def make_calls(fast: bool, store: wasmtime.Store, memory: wasmtime.Memory,
               funcs: dict[str, wasmtime.Func]) -> FastCalls | PublicCalls:
    if fast and FAST_AVAILABLE:
        return FastCalls(store, memory, funcs)
    return PublicCalls(store, memory, funcs)
