"""Guest-call adapters: the fast private wasmtime-py path and the public fallback.

Why: ``Func.__call__`` rebuilds the function type and boxes every argument (13–100 µs per call on
the gateway), which alone would blow the 70 µs p99 budget. :class:`FastCalls` pre-binds each export
and calls ``wasmtime_func_call_unchecked`` with one preallocated raw-value buffer; memory is read
with ``ctypes.string_at`` after a bounded NUL scan. Both use private wasmtime-py internals, pinned
(:mod:`agent.wasm.pinned`) and resolved once, on first use (:func:`fast_path`); :class:`PublicCalls`
does the same job through the public API and is selected by ``[policy] fast_calls = false`` or
automatically — logged as ``wasm_shim_fallback`` — under another wasmtime-py or when an internal is
missing. The memory base pointer is re-read after every guest call (the guest may grow memory and
move it).

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
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

import wasmtime

from agent.wasm import pinned


def _addr(fn: Any) -> int:
    """The C address of a ctypes function (to rebind it with a leaner prototype)."""
    value = ctypes.cast(fn, ctypes.c_void_p).value
    if value is None:
        raise AttributeError("null function pointer")
    return int(value)


# ctypes.memmove is a CFUNCTYPE: it drops and retakes the GIL around a copy of a few hundred bytes, and
# under load retaking it means queueing behind the writer / module threads (measured: the input copy
# cost as much loop time as the whole guest call). Copies this small never need to release the GIL.
memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    _addr(ctypes.memmove))
_string_at = ctypes.string_at
_unpack_i32 = struct.Struct("<I").unpack_from  # unsigned: addresses


@dataclass(frozen=True)
class FastPath:
    """The wasmtime-py 50.0.1 internals (and the libc call) the fast path uses, resolved and checked once.

    ``mem_data(ctx, mem)`` / ``mem_size(ctx, mem)`` / ``set_deadline(ctx, ticks)`` take the raw store
    context and memory addresses of :class:`FastCalls` (``ctx_addr``, ``mem_addr``) and keep the GIL."""

    call_unchecked: Any
    mem_data: Any
    mem_size: Any
    set_deadline: Any
    memchr: Any
    trap_ptr: Any
    val_raw: Any
    raw_callback: Any
    define_raw: Any
    no_finalizer: Any
    trap_new: Any


def _resolve() -> FastPath:
    from wasmtime import _bindings, _ffi  # the private modules this shim is pinned to

    dll: Any = _bindings.dll  # type: ignore[attr-defined]
    libc = ctypes.CDLL(None)
    define_raw = _bindings.wasmtime_linker_define_func_unchecked
    path = FastPath(
        call_unchecked=_bindings._wasmtime_func_call_unchecked,  # noqa: SLF001 - pinned internal: the raw call
        mem_data=ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)(
            _addr(dll.wasmtime_memory_data)),
        mem_size=ctypes.PYFUNCTYPE(ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)(
            _addr(dll.wasmtime_memory_data_size)),
        set_deadline=ctypes.PYFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)(
            _addr(dll.wasmtime_context_set_epoch_deadline)),
        memchr=ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)(
            _addr(libc.memchr)),
        trap_ptr=ctypes.POINTER(_ffi.wasm_trap_t),
        val_raw=_ffi.wasmtime_val_raw_t,
        raw_callback=_bindings.wasmtime_func_unchecked_callback_t,
        define_raw=define_raw,
        # a NULL function pointer of the finalizer argument's type
        no_finalizer=_bindings._wasmtime_linker_define_func_unchecked.argtypes[8](),  # noqa: SLF001 - pinned
        trap_new=_bindings.wasmtime_trap_new,
    )
    if ctypes.sizeof(path.val_raw) != 16:  # callers pack arguments at 16-byte strides
        raise AttributeError("wasmtime_val_raw_t is not 16 bytes in this wasmtime-py")
    return path


@cache
def fast_path() -> FastPath | None:
    """The fast path's internals, or None (logged once) under another wasmtime-py or when one is missing."""
    problem = pinned.wasmtime_problem()
    if problem is None:
        try:
            return _resolve()
        except (ImportError, AttributeError, OSError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    pinned.fallback("fast_calls", problem, instead="guest calls through wasmtime-py's public API (~10x slower)")
    return None


@cache
def last_exception_slot() -> Any:
    """wasmtime-py's module holding its one process-global host-exception slot, or None (logged)."""
    problem = pinned.wasmtime_problem()
    if problem is None:
        try:
            from wasmtime import _func

            if hasattr(_func, "LAST_EXCEPTION"):
                return _func
            problem = "wasmtime._func has no LAST_EXCEPTION"
        except ImportError as exc:
            problem = f"ImportError: {exc}"
    pinned.fallback("host_exception_slot", problem,
                    instead="a failed host call's marker may stay in wasmtime-py's global slot")
    return None


def forget_host_exception(exc: BaseException | None) -> None:
    """Clear wasmtime-py's global host-exception slot if it still holds ``exc`` (ours), else leave it."""
    if exc is None:
        return
    slot = last_exception_slot()
    if slot is not None and slot.LAST_EXCEPTION is exc:
        slot.LAST_EXCEPTION = None


def _same(exc: BaseException) -> BaseException:
    return exc


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
    Build it only when :func:`fast_path` is not None (``make_calls`` does). ``mem_data``, ``mem_size``
    and ``set_deadline`` are the raw handles, bound here for callers' hot loops (``(ctx_addr, mem_addr)``).
    """

    def __init__(self, store: wasmtime.Store, memory: wasmtime.Memory, funcs: dict[str, wasmtime.Func],
                 path: FastPath) -> None:
        self.path = path
        self.store = store
        self.ctx = store._context()  # noqa: SLF001 - pinned internal: the raw store context
        self.ctx_addr = ctypes.cast(self.ctx, ctypes.c_void_p).value
        raw_memory = memory._memory  # noqa: SLF001 - pinned internal: the raw memory handle
        self.mem_ref = ctypes.byref(raw_memory)
        self.mem_addr = ctypes.addressof(raw_memory)
        self.refs = {name: ctypes.byref(f._func) for name, f in funcs.items()}  # noqa: SLF001 - raw func handles
        self.mem_data = path.mem_data
        self.mem_size_of = path.mem_size
        self.set_deadline_of = path.set_deadline
        self._call = path.call_unchecked
        self._memchr = path.memchr
        self._bufs = [(path.val_raw * 8)() for _ in range(4)]
        self._depth = 0
        self.trap = path.trap_ptr()
        self.trap_ref = ctypes.byref(self.trap)
        self.on_fail: Callable[[BaseException], BaseException] = _same

    def _fail(self, err: Any) -> None:
        """Raise the failed call's cause: the instance's own host exception, else the trap/error.
        wasmtime-py's global slot is deliberately not read (another thread may own what it holds)."""
        trap = self.trap
        self.trap = self.path.trap_ptr()
        self.trap_ref = ctypes.byref(self.trap)
        exc: BaseException = (wasmtime.WasmtimeError._from_ptr(err) if err  # noqa: SLF001 - pinned: wrap the C error
                              else wasmtime.Trap._from_ptr(trap))  # noqa: SLF001 - pinned: wrap the C trap
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
            err = self._call(self.ctx, self.refs[name], buf, 8, self.trap_ref)
        finally:
            self._depth = depth
        if err or self.trap:
            self._fail(err)
        return int(buf[0].i32) & 0xFFFFFFFF  # addresses are unsigned

    def call_ref(self, ref: Any, buf: Any) -> int:
        """The hot path: arguments already in ``buf`` (a top-level buffer from :meth:`buffer`)."""
        self._depth = 1
        try:
            err = self._call(self.ctx, ref, buf, 8, self.trap_ref)
        finally:
            self._depth = 0
        if err or self.trap:
            self._fail(err)
        return int(_unpack_i32(buf)[0])

    def buffer(self) -> Any:
        return self._bufs[0]

    def set_deadline(self, ticks: int) -> None:
        self.set_deadline_of(self.ctx_addr, ticks)

    def base(self) -> int:
        return int(self.mem_data(self.ctx_addr, self.mem_addr) or 0)

    def mem_size(self) -> int:
        return int(self.mem_size_of(self.ctx_addr, self.mem_addr))

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > self.mem_size():
            raise IndexError("write outside guest memory")
        memmove(self.base() + addr, data, len(data))

    def read_cstr(self, addr: int, limit: int) -> bytes:
        size = self.mem_size_of(self.ctx_addr, self.mem_addr)
        if addr <= 0 or addr >= size:
            raise OutputTooLarge(f"string address {addr} is outside guest memory ({size} bytes)")
        start = self.mem_data(self.ctx_addr, self.mem_addr) + addr
        span = min(size - addr, limit + 1)
        end = self._memchr(start, 0, span)
        if not end:
            raise OutputTooLarge(f"string at {addr} is longer than {limit} bytes or not terminated")
        return _string_at(start, end - start)


_HOST_TRAP_MSG = b"host function failed (the error is kept on the policy instance)"


def define_host_func(path: FastPath, linker: wasmtime.Linker, name: str, *, params: int, results: int,
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
            trap = path.trap_new(_HOST_TRAP_MSG, len(_HOST_TRAP_MSG))
            return int(ctypes.cast(trap, ctypes.c_void_p).value or 0)

    callback = path.raw_callback(host)
    ty = wasmtime.FuncType([wasmtime.ValType.i32()] * params, [wasmtime.ValType.i32()] * results)
    keep.extend((callback, ty))
    module, fname = b"env", name.encode()
    err = path.define_raw(linker.ptr(), module, len(module), fname, len(fname), ty.ptr(), callback, None,
                          path.no_finalizer)
    if err:
        raise wasmtime.WasmtimeError._from_ptr(err)  # noqa: SLF001 - pinned internal: wrap the C error


def make_calls(fast: bool, store: wasmtime.Store, memory: wasmtime.Memory,
               funcs: dict[str, wasmtime.Func]) -> FastCalls | PublicCalls:
    path = fast_path() if fast else None
    if path is not None:
        return FastCalls(store, memory, funcs, path)
    return PublicCalls(store, memory, funcs)
