"""Install-time "can this agent run it?" checks: real OPA-ABI policies (C → Wasm), real WASI modules
(WAT), the real release store on SQLite; the compile is cached with the release and reused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from agent.config.modules import ModuleSettings
from agent.config.policy import PolicySettings
from agent.daemon.releases import release_store
from agent.storage import Store
from agent.trust import errors as E
from agent.trust.releases import ReleaseStore
from agent.trust.truststore import add_key
from agent.wasm import codecache
from agent.wasm.engine import shared_engine
from agent_devkit.releases import Signer, opa_bundle, policy_wasm, wasm_module


@pytest.fixture
def signer() -> Signer:
    return Signer.create()


@pytest.fixture
def store(tmp_path: Path, signer: Signer) -> Iterator[Store]:
    s = Store.open(tmp_path / "state")
    s.writer.run_sync(add_key(signer.trusted()))
    try:
        yield s
    finally:
        s.close()


def cache_rows(store: Store) -> list[tuple[str, str]]:
    conn = store.reader()
    try:
        return [(str(a), str(b)) for a, b in conn.execute("SELECT sha256, fingerprint FROM code_cache")]
    finally:
        conn.close()


def error_codes(store: Store) -> list[str]:
    conn = store.reader()
    try:
        return [str(r[0]) for r in conn.execute("SELECT code FROM errors WHERE component = 'trust' ORDER BY id")]
    finally:
        conn.close()


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@pytest.mark.parametrize("action", ["install", "stage"])
def test_policy_needing_a_missing_builtin_is_refused_naming_it(store: Store, signer: Signer, action: str) -> None:
    rs = release_store(store)
    good = policy_wasm()
    rs.install(good, signer.sign(good, "policy", "gate", 1))
    before = (rs.list(include_retired=True), cache_rows(store), rs.floor("policy", "gate"))
    for artifact in (policy_wasm(policy="builtins"), opa_bundle(wasm=policy_wasm(policy="builtins"))):
        with pytest.raises(E.PolicyUnsupported) as info:
            getattr(rs, action)(artifact, signer.sign(artifact, "policy", "gate", 2))
        assert info.value.code == "policy_unsupported"
        message = str(info.value)
        for name in ("custom.cat4", "custom.fail", "custom.undef", "custom.zero"):
            assert name in message
        assert "sprintf" not in message.split("provide:")[1]  # only the missing ones are named
        assert "policy_builtin_missing" in message  # the engine's own code, for the technician's search
        assert (rs.list(include_retired=True), cache_rows(store), rs.floor("policy", "gate")) == before
    assert error_codes(store) == ["policy_unsupported", "policy_unsupported"]


def test_policy_with_agent_builtins_registered_installs(store: Store, signer: Signer) -> None:
    """The check uses the builtins the daemon is given: register the custom ones and the same bytes pass."""
    from agent.policy.builtins import default_builtins
    builtins = default_builtins()
    for name in ("custom.cat4", "custom.fail", "custom.undef", "custom.zero"):
        builtins.register(name, lambda _ctx, *args: None)
    blob = policy_wasm(policy="builtins")
    rel = release_store(store, builtins=builtins).install(blob, signer.sign(blob, "policy", "b", 1))
    assert rel.state == "active"


def test_policy_entrypoint_named_by_predicate_must_exist(store: Store, signer: Signer) -> None:
    rs = release_store(store)
    blob = policy_wasm()
    with pytest.raises(E.PolicyUnsupported, match=r"entrypoint\(s\) \['app/nope'\].*app/rbac/allow"):
        rs.install(blob, signer.sign(blob, "policy", "gate", 1, entrypoints=["app/nope"]))
    assert rs.install(blob, signer.sign(blob, "policy", "gate", 1, entrypoints=["app/rbac/allow"])).version == 1


def test_non_opa_wasm_as_policy_is_refused(store: Store, signer: Signer) -> None:
    blob = wasm_module()
    with pytest.raises(E.PolicyUnsupported, match=r"env\.memory"):
        release_store(store).install(blob, signer.sign(blob, "policy", "gate", 1))


@pytest.mark.parametrize(("wasm", "meta", "needle"), [
    (wat('(module (func (export "run")))'), {}, "no '_start'"),
    (wat('(module (import "env" "read_sensor" (func)) (func (export "_start")))'), {}, "env::read_sensor"),
    (wat('(module (import "wasi_snapshot_preview1" "no_such_call" (func)) (func (export "_start")))'), {},
     "no_such_call"),
    (wat('(module (memory 1000) (func (export "_start")))'), {}, "memory cap 32 MiB"),
    (wasm_module(), {"trigger": {"type": "interval", "every_s": 10}}, "trigger.type"),
    (wasm_module(), {"trigger": {"type": "topic", "topics": ["a/#/b"]}}, "not a valid MQTT topic filter"),
], ids=["no_start", "env_import", "unknown_wasi_call", "memory_over_cap", "unknown_trigger", "bad_filter"])
def test_module_the_runtime_cannot_run_is_refused(store: Store, signer: Signer, wasm: bytes,
                                                  meta: dict[str, object], needle: str) -> None:
    rs = release_store(store)
    good = wasm_module()
    rs.install(good, signer.sign(good, "module", "m", 1))
    before = (rs.list(include_retired=True), cache_rows(store))
    with pytest.raises(E.ModuleUnsupported) as info:
        rs.install(wasm, signer.sign(wasm, "module", "m", 2, **meta))
    assert info.value.code == "module_unsupported" and needle in str(info.value)
    assert (rs.list(include_retired=True), cache_rows(store)) == before


def test_module_limits_follow_the_gateway_config(store: Store, signer: Signer) -> None:
    """A module needing 64 MiB is refused with the default 32 MiB cap and accepted where the config allows."""
    blob = wat('(module (memory 1024) (func (export "_start")))')  # 1024 pages = 64 MiB
    with pytest.raises(E.ModuleUnsupported, match="memory cap 32 MiB"):
        release_store(store).install(blob, signer.sign(blob, "module", "big", 1))
    roomy = release_store(store, modules=ModuleSettings(memory_limit_mb=128))
    assert roomy.install(blob, signer.sign(blob, "module", "big", 1, limits={"memory_mb": 100})).state == "active"


def test_real_example_module_with_documented_trigger_installs(store: Store, signer: Signer) -> None:
    from agent_devkit.examples import example
    blob = example("counter")
    meta = {"trigger": {"type": "mixed", "schedule": {"cron": "*/5 * * * *"}, "topics": ["factory/+/+/temp"]}}
    assert release_store(store).install(blob, signer.sign(blob, "module", "counter", 1, **meta)).state == "active"


@pytest.mark.parametrize("kind", ["policy", "module"])
def test_install_compiles_once_and_the_runtime_reuses_it(store: Store, signer: Signer, kind: str) -> None:
    blob = policy_wasm("reuse") if kind == "policy" else wasm_module(exports=("reuse",))
    rel = release_store(store, policy=PolicySettings()).install(blob, signer.sign(blob, kind, "r", 1))
    engine = shared_engine()
    assert cache_rows(store) == [(rel.sha256, engine.fingerprint)]
    compiled: list[int] = []

    def loader() -> bytes:
        compiled.append(1)
        return blob
    module = codecache.load_module(store, engine, rel.sha256, loader)  # what the daemon's loaders call
    assert compiled == [] and any(e.name for e in module.exports)


def test_a_kind_no_runtime_here_can_load_is_refused_and_nothing_is_stored(store: Store, signer: Signer) -> None:
    """The release store only stores what a runtime said it can run: with no checker for a kind (a
    store built without runtimes) a release of that kind is refused, not stored unchecked."""
    blob = wasm_module()
    with pytest.raises(E.KindUnsupported, match="no module runtime") as info:
        ReleaseStore(store).install(blob, signer.sign(blob, "module", "m", 1))
    assert info.value.code == "kind_unsupported"
    assert ReleaseStore(store).list(include_retired=True) == []
    assert error_codes(store) == ["kind_unsupported"]
