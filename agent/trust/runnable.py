"""Can this gateway actually run a verified release? The install-time half of the runtimes' load checks.

``verify_release`` proves who signed the bytes and that they are well-formed Wasm / an OPA bundle; it
is pure and also runs on the fleet side. This step runs only on the gateway, before anything is
stored, and asks the real runtimes — never a copy of their rules:

- a policy is compiled and instantiated by :func:`agent.policy.engine.load_policy` with the builtins
  the daemon gives it (a builtin it lacks → ``policy_unsupported`` naming it; the engine reports it as
  ``policy_builtin_missing``); the entrypoints the predicate names must exist;
- a module's predicate is read by :func:`agent.runtime.spec.parse_spec` and its Wasm instantiated by
  :meth:`agent.runtime.runner.ModuleRunner.check` with the runtime's own linker and limits (no
  ``_start``, an import outside WASI preview1, more memory than allowed → ``module_unsupported``).

The compile goes through the precompiled-code cache: a hit is reused; on a miss the compiled code is
returned so the release store writes it in the same transaction that stores the release (a rejected
release leaves no cache row behind), and the daemon then loads it without compiling again.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.errors import AgentError
from agent.trust.errors import ModuleUnsupported, PolicyUnsupported, ReleaseRejected

if TYPE_CHECKING:
    import wasmtime

    from agent.config.modules import ModuleSettings
    from agent.config.policy import PolicySettings
    from agent.policy.registry_builtins import Builtins
    from agent.trust.verify import VerifiedRelease
    from agent.wasm.engine import WasmEngine


@dataclass(frozen=True)
class Runnable:
    """The compiled module; ``code`` is its serialized form when the cache had none (to be stored)."""

    module: wasmtime.Module
    code: bytes | None
    fingerprint: str


def _compile(v: VerifiedRelease, wasm: bytes, conn: sqlite3.Connection, engine: WasmEngine,
             rejected: type[ReleaseRejected]) -> Runnable:
    import wasmtime

    from agent.wasm import codecache

    cached = codecache.lookup(conn, engine, v.sha256)
    if cached is not None:
        return Runnable(cached, None, engine.fingerprint)
    try:
        module = engine.compile(wasm)
    except wasmtime.WasmtimeError as exc:
        raise rejected(f"{v.kind} {v.name} v{v.version} does not compile on this gateway: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'error'}") from None
    return Runnable(module, engine.serialize(module), engine.fingerprint)


def check_policy(v: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection, *, settings: PolicySettings,
                 builtins: Builtins | None = None, engine: WasmEngine | None = None) -> Runnable:
    """Load the policy exactly as the daemon will; raise :class:`PolicyUnsupported` if it cannot."""
    from agent.policy.bundle import read_bundle
    from agent.policy.engine import load_policy
    from agent.wasm.engine import shared_engine

    wasm_engine = engine or shared_engine()
    wasm = read_bundle(artifact).wasm if v.artifact_format == "opa_bundle" else artifact
    compiled = _compile(v, wasm, conn, wasm_engine, PolicyUnsupported)
    try:
        policy = load_policy(artifact, settings=settings, name=v.name, version=v.version, builtins=builtins,
                             module=compiled.module, engine=wasm_engine)
    except AgentError as exc:
        raise PolicyUnsupported(f"policy {v.name} v{v.version} cannot be loaded by this agent "
                                f"({exc.code}): {exc}") from None
    try:
        missing = [e for e in v.predicate.entrypoints if e not in policy.entrypoints]
        if missing:
            raise PolicyUnsupported(f"policy {v.name} v{v.version}: the predicate names entrypoint(s) {missing} "
                                    f"that policy.wasm does not export (it has {sorted(policy.entrypoints)})")
    finally:
        policy.close()
    return compiled


def check_module(v: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection, *, settings: ModuleSettings,
                 engine: WasmEngine | None = None) -> Runnable:
    """Read the run spec and instantiate the module as a run would; raise :class:`ModuleUnsupported`."""
    from agent.runtime.runner import Limits, ModuleRunner
    from agent.runtime.spec import ModuleSpecInvalid, effective_limits, parse_spec
    from agent.wasm.engine import shared_engine

    try:
        spec = parse_spec(v.predicate.raw)
    except ModuleSpecInvalid as exc:
        raise ModuleUnsupported(f"module {v.name} v{v.version}: the predicate does not say how to run it: "
                                f"{exc}") from None
    wasm_engine = engine or shared_engine()
    compiled = _compile(v, artifact, conn, wasm_engine, ModuleUnsupported)
    deadline_s, memory, stdout = effective_limits(spec, settings)
    why = ModuleRunner(wasm_engine).check(compiled.module, Limits(deadline_s, memory, stdout))
    if why is not None:
        raise ModuleUnsupported(f"module {v.name} v{v.version} cannot run on this agent ({why.outcome}): "
                                f"{why.error}")
    return compiled


def check_runnable(v: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection, *,
                   policy_settings: PolicySettings, module_settings: ModuleSettings,
                   builtins: Builtins | None = None, engine: WasmEngine | None = None) -> Runnable:
    """Dispatch on ``v.kind``. Blocking (a compile on a cache miss: ~100 ms for an OPA policy)."""
    if v.kind == "policy":
        return check_policy(v, artifact, conn, settings=policy_settings, builtins=builtins, engine=engine)
    return check_module(v, artifact, conn, settings=module_settings, engine=engine)
