"""Helpers for the module runtime tests: built example modules, a real Store, a runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from agent.config.modules import ModuleSettings
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def settings(**kw: Any) -> ModuleSettings:
    base: dict[str, Any] = {"run_deadline_ms": 300, "memory_limit_mb": 16, "stdout_limit_bytes": 64 * 1024}
    base.update(kw)
    return ModuleSettings(**base)


def make_runtime(state_dir: Path, **kw: Any) -> tuple[Store, ModuleRuntime]:
    store = Store.open(state_dir)
    return store, ModuleRuntime(store, settings(**kw), state_dir=state_dir)


async def load(rt: ModuleRuntime, name: str, wasm: bytes, predicate: dict[str, Any] | None = None,
               version: int = 1) -> None:
    await rt.load_release(name, version, sha(wasm), wasm, predicate or {"kind": "module", "name": name,
                                                                        "version": version})


def rows(store: Store, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = store.reader()
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()
