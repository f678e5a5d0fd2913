"""OPA-Wasm policy engine: load ``opa build -t wasm`` output and evaluate it, sandboxed and fast.

Public API (used by the pipeline for actuation gating and the fleet component for shadow
evaluation and hot swap):

* :func:`load_policy` → :class:`Policy` (raw ``policy.wasm`` bytes/path or an OPA bundle ``.tar.gz``);
* :meth:`Policy.evaluate` → :class:`ResultSet` (``[]`` = undefined, distinct from ``false``/``null``);
  :meth:`Policy.evaluate_json` takes the input already encoded (:func:`encode_input`) and also returns
  the result set's JSON bytes as the guest wrote them (the pipeline logs both texts as they are);
* :class:`PolicyLoadError`, :class:`PolicyEvalError` (``code``: trap, deadline, memory, abort,
  builtin_error, output_too_large, bad_input, unknown_entrypoint).

ABI 1.0–1.3 (the contract is written up in ``docs/design.md``, "The OPA-Wasm ABI"): minor ≥ 2 uses
the one-call ``opa_eval`` fast path (the input is written at the data heap pointer and the heap starts
where the input ends, so the guest's scratch allocations cannot overwrite it); older modules use the
context path. A builtin the agent lacks is refused at load, naming it.

Threads: a ``Policy`` owns a small pool of instances (one Store each; Stores are single-threaded).
``evaluate`` takes an idle instance or builds one, so it may be called from the event-loop thread
(the daemon does this: one evaluation is tens of µs, cheaper than a thread hop) and from pool
threads at the same time. Swapping a policy is swapping the ``Policy`` reference
(:class:`agent.policy.registry.PolicyRegistry`): evaluations in flight finish on the old object.

Sandbox: a deadline per evaluation, a memory cap per instance (memory type max +
``Store.set_limits``), an output cap; after any failure the instance is discarded, never reused.
The deadline is an epoch deadline for guest code, and it also covers the Python host builtins
(which the epoch cannot interrupt): the dispatcher refuses to start a builtin once the deadline has
passed, and an evaluation that called a builtin and ends past the deadline fails the same way
(``code="deadline"``). Cost: one ``perf_counter_ns`` per builtin call, none without builtins.

Host-function errors (builtin failures, ``opa_abort``) are kept on the failing instance, never taken
from wasmtime-py's process-global exception slot, so concurrent evaluations on several threads each
report their own error (see :mod:`agent.wasm.calls`; the fast path does not use the slot at all).
"""

from __future__ import annotations

import json
import struct
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import wasmtime

from agent import jsonsafe
from agent.config.policy import PolicySettings
from agent.logs import get_logger
from agent.policy import json_encoder
from agent.policy.errors import BuiltinError, PolicyEvalError, PolicyLoadError
from agent.policy.registry_builtins import UNDEFINED, BuiltinContext, Builtins
from agent.wasm import calls as wasm_calls
from agent.wasm.bundle import BundleError, is_bundle, read_bundle
from agent.wasm.calls import (
    FastCalls,
    OutputTooLarge,
    PublicCalls,
    define_host_func,
    forget_host_exception,
    make_calls,
)
from agent.wasm.engine import WasmEngine, shared_engine

__all__ = ["NO_INPUT", "Policy", "PolicyEvalError", "PolicyLoadError", "ResultSet", "encode_input", "load_policy"]

log = get_logger("policy")

PAGE = 65536
_I32 = wasmtime.ValType.i32()
_ENCODE = json_encoder.ENCODE
_DECODE = json.JSONDecoder().decode
# the size is capped by max_output_bytes already; Rego numbers may be longer than 64 bits
RESULT_LIMITS = jsonsafe.Limits(1 << 30, max_depth=128, max_int_digits=jsonsafe.BIG_INT_DIGITS)
_PACK_EVAL_ARGS = struct.Struct("<" + "i12x" * 7).pack_into
_memmove = wasm_calls.memmove
LATENCY_BUCKETS_US = (10, 20, 30, 50, 70, 100, 200, 500, 1000, 5000, 20000, 100000)


class _NoInput:
    def __repr__(self) -> str:
        return "NO_INPUT"


NO_INPUT: Any = _NoInput()
"""Pass as ``input`` to leave ``input`` undefined (``None`` means JSON ``null``)."""


@dataclass(frozen=True)
class ResultSet:
    """OPA's result set: ``raw`` is the list exactly as the policy gave it."""

    raw: list[Any]

    @property
    def defined(self) -> bool:
        return len(self.raw) > 0

    @property
    def value(self) -> Any:
        """The decision (``raw[0]["result"]``), or ``None`` when undefined — check ``defined``."""
        if not self.raw:
            return None
        first = self.raw[0]
        return first.get("result") if isinstance(first, dict) else first


class _Abort(Exception):
    """Raised from ``opa_abort``: the guest hit a fatal error."""


class _HostFailed(Exception):
    """What a host import raises into wasmtime-py instead of the real exception.

    wasmtime-py parks it in a process-global slot that another thread may read or overwrite; the
    real exception stays on the instance (:meth:`_Instance._host_failed`), so this marker carries
    nothing worth losing.
    """


class _LostTrap(Exception):
    """Public-API path only: the guest trapped, but wasmtime-py handed us another thread's marker
    (from its global slot) in place of the trap, so the trap's own detail is gone."""


class _DeadlineHit(Exception):
    """The evaluation's deadline passed while (or before) a Python host builtin ran."""


@dataclass
class PolicyStats:
    """Health counters the fleet component reads (monotonic; reset by replacing the Policy)."""

    evals: int = 0
    undefined: int = 0
    errors: int = 0
    traps: int = 0
    deadline_hits: int = 0
    instances_created: int = 0
    instances_discarded: int = 0
    latency_us: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_US) + 1))
    errors_by_code: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> dict[str, Any]:
        return {"evals": self.evals, "undefined": self.undefined, "errors": self.errors, "traps": self.traps,
                "deadline_hits": self.deadline_hits, "instances_created": self.instances_created,
                "instances_discarded": self.instances_discarded, "errors_by_code": dict(self.errors_by_code),
                "latency_buckets_us": list(LATENCY_BUCKETS_US), "latency_counts": list(self.latency_us)}


# bound on guest code run while loading (start function, builtins()/entrypoints(), parsing data):
# generous, since big data documents take a while to parse, but never unbounded
SETUP_DEADLINE_S = 5.0
_GUEST_FAILED = (_Abort, _LostTrap, _DeadlineHit, BuiltinError, wasmtime.Trap, wasmtime.WasmtimeError)
_perf_ns = time.perf_counter_ns

_REQUIRED = ("opa_malloc", "opa_json_parse", "opa_json_dump", "opa_heap_ptr_get", "opa_heap_ptr_set",
             "builtins", "entrypoints", "opa_eval_ctx_new", "opa_eval_ctx_set_input", "opa_eval_ctx_set_data",
             "opa_eval_ctx_set_entrypoint", "opa_eval_ctx_get_result", "eval")


class _Shape:
    """What load learned about the module: ABI, imports, maps (shared by all its instances)."""

    def __init__(self, module: wasmtime.Module) -> None:
        self.mem_min = 2
        self.imports: set[str] = set()
        for imp in module.imports:
            name = imp.name or ""
            if imp.module != "env":
                raise PolicyLoadError(f"policy imports {imp.module}.{name}, which is not part of the OPA Wasm ABI")
            ty = imp.type
            if name == "memory":
                if not isinstance(ty, wasmtime.MemoryType):
                    raise PolicyLoadError("policy import env.memory is not a memory")
                self.mem_min = ty.limits.min
            elif name in ("opa_abort", "opa_println") or (name.startswith("opa_builtin") and name[11:] in
                                                            ("0", "1", "2", "3", "4")):
                self.imports.add(name)
            else:
                raise PolicyLoadError(f"policy imports env.{name}, which the OPA Wasm ABI does not define; "
                                      "is this really 'opa build -t wasm' output?")
        if "memory" not in {imp.name for imp in module.imports}:
            raise PolicyLoadError("policy does not import env.memory; not an OPA Wasm policy")
        self.major = 0
        self.minor = 0
        self.builtin_names: dict[int, str] = {}
        self.entrypoints: dict[str, int] = {}


class _Instance:
    """One Store + instance + loaded data. Single-threaded; discarded after any failure."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        shape = policy.shape
        settings = policy.settings
        self.generation = policy.data_generation
        self.bctx = BuiltinContext(now_ns=time.time_ns())
        # a host import's real exception (the first one of the failing call) and the marker raised for
        # it into wasmtime-py; set before instantiating: the start function may already call opa_abort
        self.host_exc: BaseException | None = None
        self.host_marker: _HostFailed | None = None
        # builtin deadline (perf_counter ns): set per evaluation of a policy with builtins; until then
        # the load bound. builtin_ns = start of this evaluation's latest builtin call (0 = none yet)
        self.deadline_ns = _perf_ns() + int(SETUP_DEADLINE_S * 1e9)
        self.builtin_ns = 0
        self.ready_ns = 0  # when data was last (re)loaded: a fresh instance's deadline starts there
        self.store = policy.wasm.new_store()
        cap = settings.memory_limit_mb * 1024 * 1024
        self.store.set_limits(memory_size=cap)
        max_pages = max(shape.mem_min, cap // PAGE)
        self.memory = wasmtime.Memory(self.store, wasmtime.MemoryType(wasmtime.Limits(shape.mem_min, max_pages)))
        linker = wasmtime.Linker(policy.wasm.engine)
        linker.define(self.store, "env", "memory", self.memory)
        self._define_imports(linker, shape.imports)
        self.calls: FastCalls | PublicCalls | None = None
        # the start function is guest code too: a signed policy that loops there must not hang the agent
        self.store.set_epoch_deadline(policy.wasm.ticks_for(SETUP_DEADLINE_S))
        try:
            inst = linker.instantiate(self.store, policy.module)
        except Exception as failed:
            exc = self.resolve_failure(failed)
            if isinstance(exc, _Abort):
                raise PolicyLoadError(f"policy aborted while starting: {exc}") from exc
            if isinstance(exc, wasmtime.Trap) and exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                raise PolicyLoadError(f"policy's start function did not finish within {SETUP_DEADLINE_S:g} s "
                                      "(an endless loop?); the policy was not loaded") from exc
            if isinstance(exc, _GUEST_FAILED):
                raise PolicyLoadError(f"policy failed to instantiate: {exc}") from exc
            raise exc from failed
        exports = inst.exports(self.store)
        self.funcs: dict[str, wasmtime.Func] = {}
        for name in (*_REQUIRED, "opa_eval", "opa_heap_blocks_stash", "opa_heap_blocks_restore",
                     "opa_heap_stash_clear", "opa_value_free", "opa_value_add_path", "opa_value_remove_path"):
            item = exports.get(name)
            if isinstance(item, wasmtime.Func):
                self.funcs[name] = item
        self.globals = {n: exports.get(n) for n in ("opa_wasm_abi_version", "opa_wasm_abi_minor_version")}
        self.calls = make_calls(settings.fast_calls, self.store, self.memory, self.funcs)
        self.calls.on_fail = self.resolve_failure
        self.eval_ref = self.calls.refs.get("opa_eval") if isinstance(self.calls, FastCalls) else None
        self.initial_heap_ptr = 0
        self.data_addr = 0
        self.data_heap_ptr = 0
        self.broken = False

    # -- imports ---------------------------------------------------------------------------------
    def _define_imports(self, linker: wasmtime.Linker, imports: set[str]) -> None:
        path = wasm_calls.fast_path() if self.policy.settings.fast_calls else None
        if path is not None:
            # raw callbacks: a failure is recorded here and never goes through wasmtime-py's global slot
            self._host_cbs: list[Any] = []
            if "opa_abort" in imports:
                define_host_func(path, linker, "opa_abort", params=1, results=0, fn=self._abort_now,
                                 failed=self._record, keep=self._host_cbs)
            if "opa_println" in imports:
                define_host_func(path, linker, "opa_println", params=1, results=0, fn=self._println_now,
                                 failed=self._record, keep=self._host_cbs)
            for n in range(5):
                if f"opa_builtin{n}" in imports:
                    define_host_func(path, linker, f"opa_builtin{n}", params=n + 2, results=1, fn=self._builtin,
                                     failed=self._record, keep=self._host_cbs)
            return
        if "opa_abort" in imports:
            linker.define_func("env", "opa_abort", wasmtime.FuncType([_I32], []), self._abort)
        if "opa_println" in imports:
            linker.define_func("env", "opa_println", wasmtime.FuncType([_I32], []), self._println)
        for n in range(5):
            if f"opa_builtin{n}" in imports:
                linker.define_func("env", f"opa_builtin{n}", wasmtime.FuncType([_I32] * (n + 2), [_I32]),
                                   self._dispatch)

    def _record(self, exc: BaseException) -> None:
        """Keep a host import's exception on this instance (the first one wins: it is the cause)."""
        if self.host_exc is None and not isinstance(exc, _HostFailed):
            self.host_exc = exc

    def _host_failed(self, exc: BaseException) -> NoReturn:
        """Public-API imports: record ``exc`` and trap the guest with a bare marker; wasmtime-py parks
        the marker in its process-global slot, where a concurrent failure on another thread may
        overwrite or take it without harm."""
        self._record(exc)
        marker = _HostFailed("host function failed; the error is kept on the policy instance")
        self.host_marker = marker
        raise marker

    def resolve_failure(self, exc: BaseException) -> BaseException:
        """The real cause of a failed guest call: this instance's own host exception if it recorded
        one, else ``exc`` (a marker that is not ours means the trap's detail was lost to another
        thread's failure — public-API path only)."""
        own = self.host_exc
        if own is not None:
            self.host_exc = None
            forget_host_exception(self.host_marker)
            self.host_marker = None
            return own
        if isinstance(exc, _HostFailed):
            return _LostTrap("the guest trapped, but its detail was lost to a concurrent host-function "
                             "failure on another thread (wasmtime-py's public call API)")
        return exc

    def _guest_str(self, addr: int, limit: int = 64 * 1024) -> str:
        try:
            if self.calls is not None:
                raw = self.calls.read_cstr(addr, limit)
            else:  # during the start function: read through the public API
                raw = PublicCalls(self.store, self.memory, {}).read_cstr(addr, limit)
        except OutputTooLarge:
            return f"<unreadable message at {addr}>"
        return raw.decode("utf-8", "replace")

    def _abort_now(self, addr: int) -> None:
        raise _Abort(self._guest_str(addr))

    def _println_now(self, addr: int) -> None:
        log.info("policy_println", policy=self.policy.name, text=self._guest_str(addr))

    def _abort(self, addr: int) -> None:
        try:
            self._abort_now(addr)
        except BaseException as exc:
            self._host_failed(exc)

    def _println(self, addr: int) -> None:
        try:
            self._println_now(addr)
        except BaseException as exc:
            self._host_failed(exc)

    def _dispatch(self, bid: int, ctx: int, *args: int) -> int:
        try:
            return self._builtin(bid, ctx, *args)
        except BaseException as exc:  # kept on this instance; wasmtime-py only sees a marker
            self._host_failed(exc)

    def _builtin(self, bid: int, _ctx: int, *args: int) -> int:
        """``opa_builtinN``: run host builtin ``bid`` on the argument values; raises on any failure."""
        calls = self.calls
        if calls is None:
            raise BuiltinError(f"policy called builtin id {bid} before it was loaded")
        name = self.policy.shape.builtin_names.get(bid)
        fn = self.policy.builtin_fns.get(bid)
        if name is None or fn is None:
            raise BuiltinError(f"policy called builtin id {bid}, which is not in its builtins() table")
        # the epoch cannot interrupt Python: never start a builtin once the evaluation's time is up
        now = _perf_ns()
        if now > self.deadline_ns:
            raise _DeadlineHit(f"host builtin {name} was not started")
        self.builtin_ns = now
        values = []
        for a in args:
            if a == 0:
                raise BuiltinError(f"builtin {name}: argument is a null value address")
            values.append(_DECODE(calls.read_cstr(calls.call("opa_json_dump", a),
                                                  self.policy.settings.max_output_bytes).decode()))
        try:
            result = fn(self.bctx, *values)
        except BuiltinError:
            raise
        except Exception as exc:  # a builtin bug or bad argument fails this evaluation only
            raise BuiltinError(f"builtin {name} failed: {type(exc).__name__}: {exc}") from exc
        if result is UNDEFINED:
            return 0
        blob = _ENCODE(result).encode()
        ptr = calls.call("opa_malloc", len(blob))
        calls.write(ptr, blob)
        value = calls.call("opa_json_parse", ptr, len(blob))
        if value == 0:
            raise BuiltinError(f"builtin {name}: the policy could not parse its result")
        return value

    # -- set-up ----------------------------------------------------------------------------------
    def abi(self) -> tuple[int, int]:
        major = self.globals["opa_wasm_abi_version"]
        minor = self.globals["opa_wasm_abi_minor_version"]
        if not isinstance(major, wasmtime.Global):
            raise PolicyLoadError("policy exports no opa_wasm_abi_version global; not an OPA Wasm policy "
                                  "(or built by an OPA older than 0.27)")
        mi = minor.value(self.store) if isinstance(minor, wasmtime.Global) else 0
        return int(major.value(self.store)), int(mi or 0)

    def read_map(self, export: str) -> dict[str, Any]:
        assert self.calls is not None
        self.calls.set_deadline(self.policy.wasm.ticks_for(SETUP_DEADLINE_S))
        addr = self.calls.call(export)
        text = self.calls.read_cstr(self.calls.call("opa_json_dump", addr), 1 << 20)
        value = json.loads(text)
        if not isinstance(value, dict):
            raise PolicyLoadError(f"policy's {export}() is not an object")
        return value

    def load_data(self, blob: bytes) -> None:
        """Initial heap pointer, parse data, stash (1.3), snapshot (docs/design.md, "Loading an instance")."""
        calls = self.calls
        assert calls is not None
        calls.set_deadline(self.policy.wasm.ticks_for(SETUP_DEADLINE_S))
        if not self.initial_heap_ptr:
            calls.call("opa_malloc", 0)
            self.initial_heap_ptr = calls.call("opa_heap_ptr_get")
        else:
            if "opa_heap_stash_clear" in self.funcs:
                calls.call("opa_heap_stash_clear")
            calls.call("opa_heap_ptr_set", self.initial_heap_ptr)
        ptr = calls.call("opa_malloc", len(blob))
        calls.write(ptr, blob)
        addr = calls.call("opa_json_parse", ptr, len(blob))
        if addr == 0:
            raise PolicyLoadError("policy runtime rejected the data document as invalid JSON")
        self.data_addr = addr
        if "opa_heap_blocks_stash" in self.funcs:
            calls.call("opa_heap_blocks_stash")
        self.data_heap_ptr = calls.call("opa_heap_ptr_get")  # always re-read after a data change
        self.generation = self.policy.data_generation
        self.ready_ns = _perf_ns()

    # -- evaluation ------------------------------------------------------------------------------
    def eval_fast(self, ep: int, blob: bytes, ticks: int, limit: int) -> bytes:
        """ABI ≥ 1.2: input written at the data heap pointer, then one ``opa_eval`` call."""
        calls = self.calls
        n = len(blob)
        addr = self.data_heap_ptr
        if isinstance(calls, FastCalls):
            ctx, mem, size_of = calls.ctx_addr, calls.mem_addr, calls.mem_size_of
            if addr + n + 8 > size_of(ctx, mem):
                self._grow(addr + n + 8 - size_of(ctx, mem))
            if n:
                _memmove(calls.mem_data(ctx, mem) + addr, blob, n)  # base re-read: memory may have moved
            buf = calls.buffer()
            # the 7 i32 arguments of opa_eval in one struct write (each raw value is 16 bytes)
            _PACK_EVAL_ARGS(buf, 0, 0, ep, self.data_addr, addr, n, addr + n, 0)
            calls.set_deadline_of(ctx, ticks)
            return calls.read_cstr(calls.call_ref(self.eval_ref, buf), limit)
        assert calls is not None
        size = calls.mem_size()
        if addr + n + 8 > size:
            self._grow(addr + n + 8 - size)
        calls.write(addr, blob)
        calls.set_deadline(ticks)
        out = calls.call("opa_eval", 0, ep, self.data_addr, addr, n, addr + n, 0)
        return calls.read_cstr(out, limit)

    def eval_ctx(self, ep: int, blob: bytes | None, ticks: int, limit: int) -> bytes:
        calls = self.calls
        assert calls is not None
        calls.set_deadline(ticks)
        calls.call("opa_heap_ptr_set", self.data_heap_ptr)
        ctx = calls.call("opa_eval_ctx_new")
        if blob is not None:
            ptr = calls.call("opa_malloc", len(blob))
            calls.write(ptr, blob)
            value = calls.call("opa_json_parse", ptr, len(blob))
            if value == 0:
                raise PolicyEvalError("policy runtime could not parse the input JSON", code="bad_input")
            calls.call("opa_eval_ctx_set_input", ctx, value)
        calls.call("opa_eval_ctx_set_data", ctx, self.data_addr)
        calls.call("opa_eval_ctx_set_entrypoint", ctx, ep)
        calls.call("eval", ctx)
        result = calls.call("opa_eval_ctx_get_result", ctx)
        return calls.read_cstr(calls.call("opa_json_dump", result), limit)

    def _grow(self, missing: int) -> None:
        pages = -(-missing // PAGE)
        try:
            self.memory.grow(self.store, pages)
        except wasmtime.WasmtimeError as exc:
            raise PolicyEvalError(f"input needs {pages} more memory pages, over the policy memory limit "
                                  f"({self.policy.settings.memory_limit_mb} MB)", code="memory") from exc


class Policy:
    """A loaded policy: compiled module, data, a pool of instances, health counters.

    Swap it as a whole reference (see ``PolicyRegistry``); never mutate a Policy in service except
    through :meth:`set_data`, which later evaluations pick up (in-flight ones finish on the old data).
    ``module``, ``wasm`` (the engine), ``shape``, ``builtin_fns`` and ``data_generation`` are what its
    instances are built from; they are set at load and read, never changed, from outside.
    """

    def __init__(self, module: wasmtime.Module, *, data: dict[str, Any] | None, settings: PolicySettings,
                 name: str, version: int, builtins: Builtins, manifest_entrypoints: tuple[str, ...] = (),
                 wasm: WasmEngine | None = None, sha256: str = "") -> None:
        self.name = name
        self.version = version
        self.settings = settings
        self.sha256 = sha256
        self.stats = PolicyStats()
        self.wasm = wasm or shared_engine()
        self.module = module
        self.shape = _Shape(module)
        self.data_generation = 0
        self._data_blob = self._encode_data(data)
        self._idle: list[_Instance] = []
        self._lock = threading.Lock()
        self._builtins = builtins
        self.builtin_fns: dict[int, Any] = {}
        self._ticks = self.wasm.ticks_for(settings.eval_deadline_ms / 1000.0)
        self._deadline_ns = settings.eval_deadline_ms * 1_000_000
        first = self._new_instance(probe=True)
        major, minor = first.abi()
        if major != 1:
            raise PolicyLoadError(f"policy uses OPA Wasm ABI {major}.{minor}; this agent supports 1.x only")
        self.shape.major, self.shape.minor = major, minor
        self.fast_path = minor >= 2 and "opa_eval" in first.funcs
        missing = [n for n in _REQUIRED if n not in first.funcs]
        if missing:
            raise PolicyLoadError(f"policy lacks required exports {missing}; not an OPA Wasm policy")
        try:
            bmap = first.read_map("builtins")
            emap = first.read_map("entrypoints")
        except (*_GUEST_FAILED, OutputTooLarge, ValueError) as exc:
            raise PolicyLoadError(f"policy's builtins()/entrypoints() failed: {exc}") from exc
        self.shape.builtin_names = {int(v): str(k) for k, v in bmap.items()}
        lacking = sorted(n for n in bmap if n not in builtins)
        if lacking:
            raise PolicyLoadError(f"policy needs builtin(s) this agent does not provide: {', '.join(lacking)}; "
                                  "rebuild the policy without them or upgrade the agent",
                                  code="policy_builtin_missing")
        self.builtin_fns = {int(v): builtins.get(str(k)) for k, v in bmap.items()}
        self.shape.entrypoints = {str(k): int(v) for k, v in emap.items()}
        unknown = [e for e in manifest_entrypoints if e not in self.shape.entrypoints]
        if unknown:
            raise PolicyLoadError(f"bundle manifest names entrypoint(s) {unknown} that policy.wasm does not "
                                  f"export (it has {sorted(self.shape.entrypoints)})")
        if manifest_entrypoints:
            self.default_entrypoint = manifest_entrypoints[0]
        else:
            by_id = sorted(self.shape.entrypoints.items(), key=lambda kv: kv[1])
            self.default_entrypoint = by_id[0][0] if by_id else ""
        try:
            first.load_data(self._data_blob)
        except _GUEST_FAILED as exc:
            raise PolicyLoadError(f"policy failed to load its data document: {exc}") from exc
        self._idle.append(first)
        log.info("policy_loaded", policy=name, version=version, abi=f"{major}.{minor}", fast_path=self.fast_path,
                 entrypoints=len(self.shape.entrypoints), builtins=sorted(bmap))

    # -- public ----------------------------------------------------------------------------------
    @property
    def entrypoints(self) -> dict[str, int]:
        """Entrypoint path → id, as the module's ``entrypoints()`` gives them."""
        return dict(self.shape.entrypoints)

    @property
    def abi_version(self) -> tuple[int, int]:
        return (self.shape.major, self.shape.minor)

    @property
    def required_builtins(self) -> list[str]:
        return sorted(self.shape.builtin_names.values())

    def evaluate(self, input: Any = NO_INPUT, entrypoint: str | None = None) -> ResultSet:
        """Evaluate one input; raise PolicyEvalError (the instance is then discarded)."""
        return self.evaluate_raw(input, entrypoint)[0]

    def evaluate_raw(self, input: Any = NO_INPUT, entrypoint: str | None = None) -> tuple[ResultSet, bytes]:
        """Like :meth:`evaluate`, also returning the result-set JSON bytes exactly as the guest wrote them."""
        try:
            blob = None if input is NO_INPUT else encode_input(input)
        except PolicyEvalError:
            self._count_error("bad_input")
            raise
        return self.evaluate_json(blob, entrypoint)

    def evaluate_json(self, blob: bytes | None, entrypoint: str | None = None) -> tuple[ResultSet, bytes]:
        """Evaluate an input already encoded as JSON (:func:`encode_input`; ``None`` = no input).

        For callers that keep the input text anyway (the pipeline's decision log): one encoding per
        decision, and what is logged is byte for byte what the policy saw. The bytes must be one
        JSON value (the guest parses them; invalid JSON fails the evaluation, never the agent).
        """
        start = time.perf_counter_ns()
        stats = self.stats
        ep_name = entrypoint or self.default_entrypoint  # None or "" = the default entrypoint
        ep = self.shape.entrypoints.get(ep_name)
        if ep is None:
            self._count_error("unknown_entrypoint")
            raise PolicyEvalError(f"policy {self.name} has no entrypoint {ep_name!r}; it has "
                                  f"{sorted(self.shape.entrypoints)}", code="unknown_entrypoint")
        inst = self._acquire()
        if self.builtin_fns:  # one time.now_ns per evaluation, fresh per-eval caches, builtin deadline
            inst.bctx = BuiltinContext(now_ns=time.time_ns())
            ready = inst.ready_ns  # a freshly built instance: its deadline starts once it is ready
            inst.deadline_ns = (start if start > ready else ready) + self._deadline_ns
            inst.builtin_ns = 0
        limit = self.settings.max_output_bytes
        try:
            if self.fast_path:
                text = inst.eval_fast(ep, blob or b"", self._ticks, limit)
            else:
                text = inst.eval_ctx(ep, blob, self._ticks, limit)
            # strict (no NaN, no 1e400, 64-bit integers): the result set is stored in the decision log and
            # forwarded to the cloud as it is
            raw = jsonsafe.loads(text, RESULT_LIMITS)
            end = _perf_ns()
            if inst.builtin_ns and end > inst.deadline_ns:  # a builtin ran, and the whole took too long
                raise _DeadlineHit("host builtins ran, and the evaluation finished after it")
        except (KeyboardInterrupt, SystemExit):
            self._discard(inst)
            raise
        except BaseException as exc:  # anything else: this instance's state is unknown
            self._discard(inst)
            raise self._classify(exc) from exc
        self._release(inst)
        if not isinstance(raw, list):
            self._count_error("trap")
            raise PolicyEvalError(f"policy {self.name} returned a non-list result set", code="trap")
        stats.evals += 1
        if not raw:
            stats.undefined += 1
        us = (end - start) // 1000
        stats.latency_us[bisect_left(LATENCY_BUCKETS_US, us)] += 1
        return ResultSet(raw), text

    def set_data(self, data: dict[str, Any] | None) -> None:
        """Replace the base data document; evaluations started after this see the new data."""
        blob = self._encode_data(data)
        with self._lock:
            self._data_blob = blob
            self.data_generation += 1

    def close(self) -> None:
        """Drop idle instances (in-flight ones are dropped when they come back)."""
        with self._lock:
            self._idle.clear()
            self.data_generation += 1

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _encode_data(data: dict[str, Any] | None) -> bytes:
        if data is None:
            return b"{}"
        if not isinstance(data, dict):
            raise PolicyLoadError("policy data must be a JSON object")
        try:
            return _ENCODE(data).encode()
        except (TypeError, ValueError) as exc:
            raise PolicyLoadError(f"policy data is not JSON-serialisable: {exc}") from exc

    def _new_instance(self, probe: bool = False) -> _Instance:
        if probe:
            inst = _Instance(self)
        else:
            try:
                inst = _Instance(self)
            except PolicyLoadError as exc:
                self._count_error("trap")
                raise PolicyEvalError(f"policy {self.name}: cannot build a fresh instance: {exc}",
                                      code="trap") from exc
        self.stats.instances_created += 1
        if not probe:
            try:
                inst.load_data(self._data_blob)
            except (*_GUEST_FAILED, PolicyLoadError) as exc:
                self._count_error("trap")
                raise PolicyEvalError(f"policy {self.name}: fresh instance failed to load data: {exc}",
                                      code="trap") from exc
        return inst

    def _acquire(self) -> _Instance:
        try:
            inst = self._idle.pop()
        except IndexError:
            return self._new_instance()
        if inst.generation != self.data_generation:
            if self.shape.minor >= 3:  # 1.3: full data replace in place (stash clear + reset + reload)
                try:
                    inst.load_data(self._data_blob)
                    return inst
                except _GUEST_FAILED:
                    self.stats.instances_discarded += 1
            return self._new_instance()
        return inst

    def _release(self, inst: _Instance) -> None:
        if inst.generation == self.data_generation and len(self._idle) < self.settings.pool_size:
            self._idle.append(inst)

    def _discard(self, inst: _Instance) -> None:
        inst.broken = True
        self.stats.instances_discarded += 1

    def _count_error(self, code: str) -> None:
        self.stats.errors += 1
        self.stats.errors_by_code[code] = self.stats.errors_by_code.get(code, 0) + 1

    def _classify(self, exc: BaseException) -> PolicyEvalError:
        code, msg = "trap", str(exc)
        if isinstance(exc, PolicyEvalError):
            code = exc.code
        elif isinstance(exc, _Abort):
            code = "memory" if "out of memory" in msg.lower() else "abort"
            msg = f"policy aborted: {msg}"
        elif isinstance(exc, _DeadlineHit):
            code = "deadline"
            msg = f"evaluation exceeded its deadline of {self.settings.eval_deadline_ms} ms ({msg})"
        elif isinstance(exc, BuiltinError):
            code = "builtin_error"
        elif isinstance(exc, OutputTooLarge):
            code = "output_too_large"
            msg = f"result is over the output limit ({self.settings.max_output_bytes} bytes): {msg}"
        elif isinstance(exc, wasmtime.Trap):
            if exc.trap_code == wasmtime.TrapCode.INTERRUPT:
                code = "deadline"
                msg = f"evaluation exceeded its deadline of {self.settings.eval_deadline_ms} ms"
            elif "memory" in msg and "out of bounds" not in msg:
                code = "memory"
            if code != "deadline":  # wasmtime puts the cause ("wasm trap: …") on the last line
                lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
                msg = f"policy trapped: {lines[-1] if lines else 'trap'}"
        elif isinstance(exc, jsonsafe.JsonRejected):
            code = "bad_result"
            msg = f"policy produced a result that is not strict JSON ({exc.code}): {msg}"
        elif isinstance(exc, ValueError | UnicodeDecodeError):
            msg = f"policy produced an unreadable result: {msg}"
        self._count_error(code)
        if code in ("trap", "memory", "abort"):
            self.stats.traps += 1
        if code == "deadline":
            self.stats.deadline_hits += 1
        log.warning("policy_eval_failed", policy=self.name, version=self.version, code=code, error=msg[:300])
        return PolicyEvalError(f"policy {self.name} v{self.version}: {msg}", code=code)


def encode_input(input: Any) -> bytes:
    """An evaluation input as the compact JSON the engine hands the guest (ASCII, no NaN / Infinity)."""
    try:
        return json_encoder.encode(input)
    except (TypeError, ValueError, RecursionError) as exc:
        raise PolicyEvalError(f"input is not JSON-serialisable: {exc}", code="bad_input") from exc


def compile_module(wasm: bytes, engine: WasmEngine) -> wasmtime.Module:
    """Compile a policy (slow: ~100 ms; call via offload in the daemon)."""
    if wasm[:4] != b"\0asm":
        raise PolicyLoadError("policy is not a WebAssembly module (no \\0asm header) nor a .tar.gz bundle")
    try:
        return engine.compile(wasm)
    except wasmtime.WasmtimeError as exc:
        raise PolicyLoadError(f"policy.wasm does not compile: {str(exc).splitlines()[0]}") from exc


def load_policy(source: bytes | Path, *, data: dict[str, Any] | None = None,
                settings: PolicySettings | None = None, name: str = "policy", version: int = 0,
                builtins: Builtins | None = None, module: wasmtime.Module | None = None,
                engine: WasmEngine | None = None, code_cache: Any = None) -> Policy:
    """Load a raw ``policy.wasm`` or an OPA bundle ``.tar.gz`` (bytes or path) into a :class:`Policy`.

    ``data`` replaces the bundle's data when given. ``builtins`` defaults to
    :func:`agent.policy.builtins.default_builtins`; pass a copy with agent-provided builtins
    registered. ``module`` lets the caller pass precompiled code; ``code_cache`` (a
    ``agent.storage.Store`` or reader connection) looks the artifact's sha256 up in
    ``agent.wasm.codecache`` and compiles + caches on a miss. Otherwise the Wasm is compiled here
    (slow — call through ``agent.offload.run_blocking`` in the daemon).
    Raises :class:`PolicyLoadError` with a message naming what is wrong.
    """
    import hashlib

    from agent.policy.builtins import default_builtins

    settings = settings or PolicySettings()
    wasm_engine = engine or shared_engine()
    try:
        blob = source.read_bytes() if isinstance(source, Path) else bytes(source)
    except OSError as exc:
        raise PolicyLoadError(f"cannot read policy {source!s}: {exc}") from exc
    manifest_eps: tuple[str, ...] = ()
    if is_bundle(blob):
        try:
            bundle = read_bundle(blob)
        except BundleError as exc:
            raise PolicyLoadError(str(exc)) from exc
        wasm = bundle.wasm
        manifest_eps = bundle.entrypoints
        if data is None:
            data = bundle.data
    else:
        wasm = blob
    if module is None and code_cache is not None:
        from agent.wasm import codecache
        if wasm[:4] != b"\0asm":
            raise PolicyLoadError("policy is not a WebAssembly module (no \\0asm header) nor a .tar.gz bundle")
        try:
            module = codecache.load_module(code_cache, wasm_engine, hashlib.sha256(blob).hexdigest(), lambda: wasm)
        except wasmtime.WasmtimeError as exc:
            raise PolicyLoadError(f"policy.wasm does not compile: {str(exc).splitlines()[0]}") from exc
    if module is None:
        module = compile_module(wasm, wasm_engine)
    return Policy(module, data=data, settings=settings, name=name, version=version,
                  builtins=builtins if builtins is not None else default_builtins(),
                  manifest_entrypoints=manifest_eps, wasm=wasm_engine,
                  sha256=hashlib.sha256(wasm).hexdigest())
