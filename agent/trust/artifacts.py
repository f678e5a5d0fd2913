"""Is the artifact what its predicate says: a valid Wasm module, a raw OPA ``policy.wasm`` or an
OPA bundle ``.tar.gz``? Tar parsing belongs to ``agent.policy.bundle`` (one safe extractor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.trust.errors import InvalidOpaBundle, InvalidWasm, Oversize, UnsafeArchive

WASM_MAGIC = b"\x00asm"
GZIP_MAGIC = b"\x1f\x8b"
if TYPE_CHECKING:
    import wasmtime
_validation_engine: wasmtime.Engine | None = None


def _engine() -> wasmtime.Engine:
    """A plain engine for validation only (validation does not depend on the epoch/opt settings)."""
    global _validation_engine
    if _validation_engine is None:
        import wasmtime  # imported on first use: `status` never needs it
        _validation_engine = wasmtime.Engine()
    return _validation_engine


def check_wasm(data: bytes, what: str = "artifact") -> None:
    if data[:4] != WASM_MAGIC:
        raise InvalidWasm(f"the {what} is not a WebAssembly binary (no \\0asm header)")
    import wasmtime
    try:
        wasmtime.Module.validate(_engine(), data)
    except wasmtime.WasmtimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid"
        raise InvalidWasm(f"the {what} is not valid WebAssembly: {first}") from None


def artifact_format(kind: str, data: bytes) -> str:
    """'wasm' or 'opa_bundle' (policies only: gzip or tar magic; raw Wasm otherwise)."""
    if kind != "policy" or data[:4] == WASM_MAGIC:
        return "wasm"
    return "opa_bundle" if data[:2] == GZIP_MAGIC or (len(data) > 262 and data[257:262] == b"ustar") else "wasm"


def classify_bundle_error(exc: Exception) -> InvalidOpaBundle | UnsafeArchive | Oversize:
    """Map the policy reader's error code to the specific rejection (codes only, never message text).

    ``agent.policy.bundle`` tags its safety failures ``bundle_unsafe`` (``..``, links, special files,
    absolute or empty names, duplicates) and ``bundle_too_large`` (member/total/count caps); anything
    else it raises is a malformed bundle.
    """
    code = getattr(exc, "code", "")
    if code == "bundle_unsafe":
        return UnsafeArchive(f"unsafe OPA bundle: {exc}")
    if code == "bundle_too_large":
        return Oversize(f"OPA bundle too large: {exc}")
    return InvalidOpaBundle(f"not a valid OPA bundle: {exc}")


def check_artifact(kind: str, data: bytes) -> str:
    """Validate the bytes for ``kind``; return the format. Raises the specific rejection."""
    fmt = artifact_format(kind, data)
    if fmt == "wasm":
        check_wasm(data, "policy" if kind == "policy" else "module")
        return fmt
    from agent.policy.bundle import BundleError, read_bundle
    try:
        parsed = read_bundle(data)
    except BundleError as exc:
        raise classify_bundle_error(exc) from None
    check_wasm(bytes(parsed.wasm), "bundle's /policy.wasm")
    return fmt
