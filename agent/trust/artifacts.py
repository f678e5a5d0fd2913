"""Is the artifact what its predicate says: a valid Wasm module, a raw OPA ``policy.wasm`` or an
OPA bundle ``.tar.gz``? Tar parsing belongs to ``agent.wasm.bundle`` (one safe extractor)."""

from __future__ import annotations

from agent.trust.errors import InvalidOpaBundle, InvalidWasm, Oversize, UnsafeArchive
from agent.wasm.bundle import BundleError, is_bundle, read_bundle

WASM_MAGIC = b"\x00asm"


def check_wasm(data: bytes, what: str = "artifact") -> None:
    if data[:4] != WASM_MAGIC:
        raise InvalidWasm(f"the {what} is not a WebAssembly binary (no \\0asm header)")
    from agent.wasm.engine import validation_problem  # imported on first use: `status` never loads wasmtime

    problem = validation_problem(data)
    if problem is not None:
        raise InvalidWasm(f"the {what} is not valid WebAssembly: {problem}")


def artifact_format(kind: str, data: bytes) -> str:
    """'wasm' or 'opa_bundle' (policies only: gzip or tar magic; raw Wasm otherwise)."""
    if kind != "policy" or data[:4] == WASM_MAGIC:
        return "wasm"
    return "opa_bundle" if is_bundle(data) else "wasm"


def classify_bundle_error(exc: BundleError) -> InvalidOpaBundle | UnsafeArchive | Oversize:
    """Map the policy reader's error code to the specific rejection (codes only, never message text).

    The bundle reader tags its safety failures ``bundle_unsafe`` (``..``, links, special files,
    absolute or empty names, duplicates) and ``bundle_too_large`` (member/total/count caps); anything
    else it raises is a malformed bundle.
    """
    code = exc.code
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
    try:
        parsed = read_bundle(data)
    except BundleError as exc:
        raise classify_bundle_error(exc) from None
    check_wasm(bytes(parsed.wasm), "bundle's /policy.wasm")
    return fmt
