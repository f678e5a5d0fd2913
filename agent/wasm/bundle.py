"""Safe reader of OPA bundles (``opa build -t wasm`` → ``bundle.tar.gz``).

Why our own reader: a bundle arrives from the network, so nothing in it is ever extracted to disk.
Members are read into memory only after their names and sizes pass the checks below, and the
result is a plain :class:`Bundle` (wasm bytes, merged data, manifest). It sits in the Wasm layer, under
both of its users: release verification (``agent.trust``) checks a policy artifact with it before it
is stored, and the policy engine loads the ``policy.wasm`` and data it holds.

Checks: regular files only (no links, devices, FIFOs); no ``..`` segment, no empty name; the
leading ``/`` that OPA writes is stripped; per-member and total uncompressed size caps; at most
``max_members`` entries; duplicate names refused. ``data.json`` files are merged at their directory
path (``a/b/data.json`` → ``data.a.b``); ``.manifest`` gives the wasm entrypoints and roots.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import jsonsafe
from agent.errors import AgentError

MAX_MEMBER_BYTES = 16 * 1024 * 1024
MAX_TOTAL_BYTES = 64 * 1024 * 1024
MAX_MEMBERS = 4096
# data documents nest as deep as a policy's data does: generous, but bounded like every other input
DATA_LIMITS = jsonsafe.Limits(MAX_MEMBER_BYTES, max_depth=128)


class BundleError(AgentError):
    """The bundle archive is unreadable, unsafe or incomplete."""

    code = "bundle_invalid"


@dataclass(frozen=True)
class Bundle:
    """What a Wasm host needs from a bundle; ``files`` keeps every member's bytes for signature checks."""

    wasm: bytes
    data: dict[str, Any]
    manifest: dict[str, Any]
    entrypoints: tuple[str, ...]
    roots: tuple[str, ...]
    revision: str
    files: dict[str, bytes] = field(repr=False)


def _clean_name(raw: str) -> str:
    name = raw.replace("\\", "/")
    while name.startswith("/"):
        name = name[1:]
    while name.startswith("./"):
        name = name[2:]
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise BundleError(f"bundle member {raw!r} has an empty name; rebuild the bundle with 'opa build'",
                          code="bundle_unsafe")
    if any(p == ".." for p in parts):
        raise BundleError(f"bundle member {raw!r} escapes the bundle ('..'); refusing the bundle",
                          code="bundle_unsafe")
    if ":" in parts[0] and len(parts[0]) == 2:
        raise BundleError(f"bundle member {raw!r} is an absolute Windows path; refusing the bundle",
                          code="bundle_unsafe")
    return "/".join(parts)


def read_members(source: bytes | Path, *, max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES, max_members: int = MAX_MEMBERS) -> dict[str, bytes]:
    """Read every regular file of a ``.tar.gz`` into memory under its cleaned name, or raise BundleError."""
    raw = source.read_bytes() if isinstance(source, Path) else source
    files: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            count = 0
            while (member := tar.next()) is not None:
                count += 1
                if count > max_members:
                    raise BundleError(f"bundle has more than {max_members} members; refusing it",
                                      code="bundle_too_large")
                if member.isdir():
                    _clean_name(member.name + "/x")  # still refuse '..' in directory names
                    continue
                if not member.isreg():
                    kind = "link" if (member.issym() or member.islnk()) else "special file"
                    raise BundleError(f"bundle member {member.name!r} is a {kind}; bundles may hold "
                                      "regular files only", code="bundle_unsafe")
                name = _clean_name(member.name)
                if member.size > max_member_bytes:
                    raise BundleError(f"bundle member {name!r} is {member.size} bytes, over the "
                                      f"{max_member_bytes}-byte limit", code="bundle_too_large")
                total += member.size
                if total > max_total_bytes:
                    raise BundleError(f"bundle is over the {max_total_bytes}-byte total size limit",
                                      code="bundle_too_large")
                if name in files:
                    raise BundleError(f"bundle member {name!r} appears twice; refusing the bundle",
                                      code="bundle_unsafe")
                handle = tar.extractfile(member)
                if handle is None:
                    raise BundleError(f"bundle member {name!r} cannot be read")
                data = handle.read(max_member_bytes + 1)
                if len(data) != member.size:
                    raise BundleError(f"bundle member {name!r} is truncated or larger than its header says")
                files[name] = data
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise BundleError(f"bundle is not a readable .tar.gz archive: {exc}") from exc
    return files


def _mount(root: dict[str, Any], path: list[str], doc: Any, member: str) -> None:
    if not path:
        if not isinstance(doc, dict):
            raise BundleError(f"{member}: the top-level data document must be a JSON object")
        _merge(root, doc, member)
        return
    node = root
    for seg in path[:-1]:
        nxt = node.setdefault(seg, {})
        if not isinstance(nxt, dict):
            raise BundleError(f"{member}: data path {'/'.join(path)} conflicts with a non-object value")
        node = nxt
    last = path[-1]
    if last in node:
        if not (isinstance(node[last], dict) and isinstance(doc, dict)):
            raise BundleError(f"{member}: data at {'/'.join(path)} is defined twice")
        _merge(node[last], doc, member)
    else:
        node[last] = doc


def _merge(into: dict[str, Any], doc: dict[str, Any], member: str) -> None:
    for key, value in doc.items():
        if key in into:
            if isinstance(into[key], dict) and isinstance(value, dict):
                _merge(into[key], value, member)
                continue
            raise BundleError(f"{member}: data key {key!r} conflicts with another data file")
        into[key] = value


def _json(member: str, blob: bytes) -> Any:
    try:
        return jsonsafe.loads(blob, DATA_LIMITS)
    except jsonsafe.JsonRejected as exc:
        raise BundleError(f"bundle member {member!r} is not valid JSON ({exc.code}): {exc}") from None


def read_bundle(source: bytes | Path, **limits: int) -> Bundle:
    """Read and validate an OPA Wasm bundle: policy.wasm, merged data, manifest entrypoints."""
    files = read_members(source, **limits)
    wasm_names = [n for n in files if n.rsplit("/", 1)[-1] == "policy.wasm"]
    if len(wasm_names) > 1:
        # which one is "the" policy would depend on the reader: the one checked at install might not
        # be the one a later reader runs
        raise BundleError(f"bundle holds {len(wasm_names)} members named policy.wasm ({sorted(wasm_names)[:4]}); "
                          "a bundle has exactly one", code="bundle_unsafe")
    manifest: dict[str, Any] = {}
    if ".manifest" in files:
        loaded = _json(".manifest", files[".manifest"])
        if not isinstance(loaded, dict):
            raise BundleError("bundle .manifest must be a JSON object")
        manifest = loaded
    wasm_entries = manifest.get("wasm") or []
    if not isinstance(wasm_entries, list) or not all(isinstance(w, dict) for w in wasm_entries):
        raise BundleError("bundle .manifest 'wasm' must be a list of {entrypoint, module} objects")
    modules = {_clean_name(str(w.get("module", "/policy.wasm"))) for w in wasm_entries}
    if len(modules) > 1:
        raise BundleError(f"bundle holds several Wasm modules ({sorted(modules)}); one policy.wasm is supported")
    module = next(iter(modules)) if modules else ("policy.wasm" if "policy.wasm" in files else
                                                  (wasm_names[0] if len(wasm_names) == 1 else ""))
    if not module or module not in files:
        raise BundleError("bundle has no policy.wasm; build it with 'opa build -t wasm'")
    data: dict[str, Any] = {}
    for name in sorted(files, key=lambda n: (n.count("/"), n)):
        base = name.rsplit("/", 1)
        if base[-1] != "data.json":
            continue
        path = base[0].split("/") if len(base) == 2 else []
        _mount(data, path, _json(name, files[name]), name)
    entrypoints = tuple(str(w["entrypoint"]) for w in wasm_entries if "entrypoint" in w)
    roots_raw = manifest.get("roots", [""])
    roots = tuple(str(r) for r in roots_raw) if isinstance(roots_raw, list) else ("",)
    return Bundle(wasm=files[module], data=data, manifest=manifest, entrypoints=entrypoints, roots=roots,
                  revision=str(manifest.get("revision", "")), files=files)


def is_bundle(blob: bytes) -> bool:
    """True for gzip (or plain tar) archives, False for raw Wasm."""
    return blob[:2] == b"\x1f\x8b" or (len(blob) > 262 and blob[257:262] == b"ustar")
