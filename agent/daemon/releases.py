"""The release store as the daemon's runtimes check it: one place that pairs each kind with its runtime.

The trust package stores only what a runtime says it can run (:mod:`agent.trust.runnable`); the
checks come from the runtimes themselves, built with the daemon's settings. The daemon's composition
root uses :func:`runnable_checks`; ``edge-agent install``, tests and benchmarks use :func:`release_store`.
"""

from __future__ import annotations

from agent.config import ModuleSettings, PolicySettings
from agent.policy.registry_builtins import Builtins
from agent.policy.runtime import PolicyRuntime
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store
from agent.trust.releases import ReleaseStore
from agent.trust.runnable import RunnableCheck
from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES
from agent.wasm.engine import WasmEngine


def runnable_checks(policies: PolicyRuntime, modules: ModuleRuntime) -> dict[str, RunnableCheck]:
    """The install-time "can this run here" check of each kind, from the runtimes that will run it."""
    return {"policy": policies.check, "module": modules.check}


def release_store(store: Store, *, policy: PolicySettings | None = None, modules: ModuleSettings | None = None,
                  builtins: Builtins | None = None, engine: WasmEngine | None = None,
                  max_artifact_bytes: int = DEFAULT_MAX_ARTIFACT_BYTES) -> ReleaseStore:
    """A release store that checks releases with these settings (the defaults: ``AgentConfig()``'s),
    for a process that runs no daemon: ``edge-agent install``, tests and benchmarks. The daemon builds
    its own in :func:`agent.daemon.wiring.build` around its runtimes, with the same checks."""
    policy_runtime = PolicyRuntime(store, policy or PolicySettings(), engine=engine, builtins=builtins)
    module_runtime = ModuleRuntime(store, modules or ModuleSettings(), state_dir=store.path.parent, engine=engine)
    return ReleaseStore(store, checkers=runnable_checks(policy_runtime, module_runtime),
                        max_artifact_bytes=max_artifact_bytes)
