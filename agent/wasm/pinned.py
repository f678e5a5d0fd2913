"""The wasmtime-py version the private-API shims of this package were written and tested against.

Each shim (:mod:`agent.wasm.calls`, :mod:`agent.wasm.wasi_io`) reaches into wasmtime-py internals for
speed or for a C call the public API lacks. Internals change without notice between releases, so a
shim uses them only under the exact version pinned in ``pyproject.toml``; under any other version (or
when an internal it needs is missing) it falls back to the public API and says so once, as the
structlog event ``wasm_shim_fallback`` with the shim's name and the reason.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import PackageNotFoundError, version

from agent.logs import get_logger

log = get_logger("wasm")

WASMTIME_PINNED = "50.0.1"


@cache
def wasmtime_problem() -> str | None:
    """Why the shims must not use wasmtime-py internals here (None: the pinned version is installed)."""
    try:
        installed = version("wasmtime")
    except PackageNotFoundError:
        return "the wasmtime package has no metadata (cannot tell its version)"
    if installed != WASMTIME_PINNED:
        return f"wasmtime-py {installed} is installed; the shims are pinned to {WASMTIME_PINNED}"
    return None


def fallback(shim: str, reason: str, *, instead: str) -> None:
    """Log that ``shim`` is not used (``reason``) and what the agent does ``instead``."""
    log.warning("wasm_shim_fallback", shim=shim, reason=reason, instead=instead)
