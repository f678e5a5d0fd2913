"""The policy runtime: the one path from a policy release to a running :class:`Policy`.

It mirrors :class:`agent.runtime.modules.ModuleRuntime` for ``kind = "policy"``. Every caller that
turns a release into a policy goes through it — the install-time check (:meth:`check`, handed to the
release store), the loader at start and on release changes (:class:`agent.policy.service.PolicyService`),
the fleet's hot swap and ``edge-agent policy eval NAME`` — so a release behaves the same whichever
way it arrived. What a release means is decided here once:

- the Wasm is the raw ``policy.wasm`` or the bundle's, compiled through the precompiled-code cache
  (keyed by the artifact's sha256) on the process's one engine;
- the bundle's data document is the base data;
- the signed predicate's ``entrypoints`` must all exist, and its first one is the default
  entrypoint (else the bundle manifest's first, else entrypoint id 0).

The active policy per name lives in :attr:`registry` (a :class:`PolicyRegistry`: swaps are one
reference assignment, evaluations in flight finish on the old object); its health counters are what
the fleet's health window judges.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import wasmtime

from agent.config import PolicySettings
from agent.logs import get_logger
from agent.offload import run_blocking
from agent.policy.engine import Policy, load_policy
from agent.policy.errors import PolicyLoadError
from agent.policy.registry import PolicyRegistry
from agent.policy.registry_builtins import Builtins
from agent.storage import Store
from agent.trust.catalog import Release
from agent.trust.errors import PolicyUnsupported
from agent.trust.runnable import Runnable
from agent.trust.verify import VerifiedRelease
from agent.wasm import codecache
from agent.wasm.bundle import BundleError, is_bundle, read_bundle
from agent.wasm.engine import WasmEngine, shared_engine

log = get_logger("policy")

ENTRYPOINT_MISSING = "policy_entrypoint_missing"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PolicyRuntime:
    """Loads, checks and holds the active policies of one agent (thread-safe where :class:`Policy` is)."""

    def __init__(self, store: Store, settings: PolicySettings, *, engine: WasmEngine | None = None,
                 builtins: Builtins | None = None, registry: PolicyRegistry | None = None) -> None:
        self.store = store
        self.settings = settings
        self.engine = engine or shared_engine()
        self.builtins = builtins
        self.registry = registry if registry is not None else PolicyRegistry()

    def reconfigure(self, settings: PolicySettings) -> None:
        """SIGHUP: policies loaded from now on get the new ``[policy]`` limits (running ones keep theirs)."""
        self.settings = settings

    # -- the install-time check (a trust.runnable.RunnableCheck) -------------------------------------
    def check(self, release: VerifiedRelease, artifact: bytes, conn: sqlite3.Connection) -> Runnable:
        """Load ``release`` exactly as :meth:`load` will; raise :class:`PolicyUnsupported` if it cannot be.

        Blocking. On a cache miss the compiled code is returned for the release store to keep."""
        name, version = release.name, release.version
        try:
            wasm = self._wasm_of(artifact)
            module, code = codecache.lookup_or_compile(conn, self.engine, release.sha256, wasm)
        except (BundleError, PolicyLoadError) as exc:
            raise PolicyUnsupported(f"policy {name} v{version} cannot be loaded by this agent ({exc.code}): "
                                    f"{exc}") from None
        except wasmtime.WasmtimeError as exc:
            raise PolicyUnsupported(f"policy {name} v{version} does not compile on this gateway: "
                                    f"{_first_line(exc)}") from None
        try:
            policy = self._instantiate(artifact, name, version, release.predicate.entrypoints, module)
        except PolicyLoadError as exc:
            if exc.code == ENTRYPOINT_MISSING:
                raise PolicyUnsupported(f"policy {name} v{version}: {exc}") from None
            raise PolicyUnsupported(f"policy {name} v{version} cannot be loaded by this agent ({exc.code}): "
                                    f"{exc}") from None
        policy.close()
        return Runnable(code, self.engine.fingerprint)

    # -- loading --------------------------------------------------------------------------------------
    def load(self, release: Release, artifact: bytes, *, data: dict[str, Any] | None = None) -> Policy:
        """The stored ``release`` as a ready :class:`Policy` (not yet active). Blocking: compiled code comes
        from the cache (a ~1 ms deserialize), a miss compiles and caches it. ``data`` replaces the
        bundle's data document. Raises :class:`PolicyLoadError` naming what is wrong."""
        try:
            wasm = self._wasm_of(artifact)
            module = codecache.load_module(self.store, self.engine, release.sha256, lambda: wasm)
        except BundleError as exc:
            raise PolicyLoadError(str(exc)) from exc
        except wasmtime.WasmtimeError as exc:
            raise PolicyLoadError(f"policy.wasm does not compile: {_first_line(exc)}") from exc
        return self._instantiate(artifact, release.name, release.version, release.predicate.entrypoints, module,
                                 data=data)

    async def aload(self, release: Release, artifact: bytes) -> Policy:
        return await run_blocking(self.load, release, artifact)

    async def load_release(self, release: Release, artifact: bytes) -> Policy:
        """Load ``release`` and make it the active policy of its name (unless that version already is: a
        version number is never reused for other bytes, the release store's floors see to that)."""
        current = self.registry.get(release.name)
        if current is not None and current.version == release.version:
            return current
        policy = await self.aload(release, artifact)
        self.registry.swap(release.name, policy)
        return policy

    def _wasm_of(self, artifact: bytes) -> bytes:
        wasm = read_bundle(artifact).wasm if is_bundle(artifact) else artifact
        if wasm[:4] != b"\0asm":
            raise PolicyLoadError("policy is not a WebAssembly module (no \\0asm header) nor a .tar.gz bundle")
        return bytes(wasm)

    def _instantiate(self, artifact: bytes, name: str, version: int, entrypoints: tuple[str, ...],
                     module: wasmtime.Module, *, data: dict[str, Any] | None = None) -> Policy:
        policy = load_policy(artifact, settings=self.settings, name=name, version=version, builtins=self.builtins,
                             module=module, engine=self.engine, data=data)
        missing = [e for e in entrypoints if e not in policy.entrypoints]
        if missing:
            policy.close()
            raise PolicyLoadError(f"the predicate names entrypoint(s) {missing} that policy.wasm does not export "
                                  f"(it has {sorted(policy.entrypoints)})", code=ENTRYPOINT_MISSING)
        if entrypoints:
            policy.default_entrypoint = entrypoints[0]
        return policy

    # -- health -----------------------------------------------------------------------------------------
    def health(self, name: str) -> dict[str, Any] | None:
        """Counters of the active version of ``name`` (evaluations, errors, traps, latency histogram)."""
        return self.registry.health(name)
