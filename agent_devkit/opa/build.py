"""Build the test policies: C → wasm32 (clang + wasm-ld), then shape the binary like `opa build` output.

wasm-ld 14 can import memory but cannot re-export it, declare immutable ABI globals or a start
section, so :func:`patch` adds exactly those to the linked module: the ``opa_wasm_abi_version`` /
``opa_wasm_abi_minor_version`` globals, ``memory`` re-exported (ABI ≥ 1.1) and a start section that
runs the runtime's initialiser during instantiation (as OPA's ``_initialize`` does).
Also usable as a script: ``python -m agent_devkit.opa.build rbac out.wasm``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

BASE_EXPORTS = ["opa_malloc", "opa_free", "opa_json_parse", "opa_value_parse", "opa_json_dump", "opa_value_dump",
                "opa_heap_ptr_get", "opa_heap_ptr_set", "builtins", "entrypoints", "opa_eval_ctx_new",
                "opa_eval_ctx_set_input", "opa_eval_ctx_set_data", "opa_eval_ctx_set_entrypoint",
                "opa_eval_ctx_get_result", "eval"]
MINOR_EXPORTS = {2: ["opa_eval"], 3: ["opa_value_free", "opa_heap_blocks_stash", "opa_heap_blocks_restore",
                                      "opa_heap_stash_clear"]}


#: the data document the ``rbac`` policy is evaluated with (tests and the policy benchmark)
RBAC_DATA: dict[str, Any] = {"app": {"rbac": {
    "user_roles": {"alice": ["admin"], "bob": ["employee", "billing"], "eve": ["customer"]},
    "role_grants": {
        "customer": [{"action": "read", "type": "dog"}, {"action": "read", "type": "cat"}],
        "employee": [{"action": "read", "type": "dog"}, {"action": "update", "type": "dog"}],
        "billing": [{"action": "read", "type": "finance"}, {"action": "update", "type": "finance"}]}}}}


def uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        done = (n == 0 and not b & 0x40) or (n == -1 and b & 0x40)
        out.append(b | (0 if done else 0x80))
        if done:
            return bytes(out)


def read_uleb(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, pos


def sections(wasm: bytes) -> list[tuple[int, bytes]]:
    assert wasm[:8] == b"\0asm\x01\0\0\0", "not a wasm module"
    pos, out = 8, []
    while pos < len(wasm):
        sid = wasm[pos]
        size, pos = read_uleb(wasm, pos + 1)
        out.append((sid, wasm[pos:pos + size]))
        pos += size
    return out


def read_name(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = read_uleb(buf, pos)
    return buf[pos:pos + n].decode(), pos + n


def _limits(buf: bytes, pos: int) -> int:
    flag, pos = read_uleb(buf, pos)
    _, pos = read_uleb(buf, pos)
    if flag & 1:
        _, pos = read_uleb(buf, pos)
    return pos


_ORDER = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 13: 5.5, 6: 6, 7: 7, 8: 8, 9: 9, 12: 10, 10: 11, 11: 12}


def patch(wasm: bytes, *, major: int, minor: int | None, export_memory: bool, start: str | None) -> bytes:
    """Add ABI globals (+ exports), the memory re-export and a start section to a linked module."""
    secs = sections(wasm)
    imported_globals = 0
    imported_funcs = 0
    for sid, body in secs:
        if sid == 2:
            count, pos = read_uleb(body, 0)
            for _ in range(count):
                _, pos = read_name(body, pos)
                _, pos = read_name(body, pos)
                kind = body[pos]
                pos += 1
                if kind == 0:
                    _, pos = read_uleb(body, pos)
                    imported_funcs += 1
                elif kind == 1:
                    pos = _limits(body, pos + 1)
                elif kind == 2:
                    pos = _limits(body, pos)
                elif kind == 3:
                    pos += 2
                    imported_globals += 1
    new_globals = [(major, "opa_wasm_abi_version")]
    if minor is not None:
        new_globals.append((minor, "opa_wasm_abi_minor_version"))
    out: dict[int, bytes] = {}
    customs: list[tuple[int, bytes]] = []
    for sid, body in secs:
        if sid == 0:
            customs.append((sid, body))
        else:
            out[sid] = body
    # globals
    gcount, gpos = read_uleb(out[6], 0) if 6 in out else (0, 0)
    gbody = out[6][gpos:] if 6 in out else b""
    first_new = imported_globals + gcount
    for value, _ in new_globals:
        gbody += b"\x7f\x00\x41" + sleb(value) + b"\x0b"
    out[6] = uleb(gcount + len(new_globals)) + gbody
    # exports
    ecount, epos = read_uleb(out[7], 0)
    ebody = out[7][epos:]
    start_idx = None
    pos = 0
    for _ in range(ecount):
        name, pos = read_name(ebody, pos)
        kind = ebody[pos]
        idx, pos = read_uleb(ebody, pos + 1)
        if kind == 0 and name == start:
            start_idx = idx
    kept = b""
    kept_count = 0
    pos = 0
    for _ in range(ecount):  # drop the initialiser's export: OPA modules do not export it
        begin = pos
        name, pos = read_name(ebody, pos)
        _, pos = read_uleb(ebody, pos + 1)
        if name != start:
            kept += ebody[begin:pos]
            kept_count += 1
    extra = b""
    n_extra = 0
    for i, (_, gname) in enumerate(new_globals):
        extra += uleb(len(gname)) + gname.encode() + b"\x03" + uleb(first_new + i)
        n_extra += 1
    if export_memory:
        extra += uleb(6) + b"memory" + b"\x02" + uleb(0)
        n_extra += 1
    out[7] = uleb(kept_count + n_extra) + kept + extra
    if start is not None:
        if start_idx is None:
            raise ValueError(f"start function {start!r} is not exported")
        out[8] = uleb(start_idx)
    result = bytearray(b"\0asm\x01\0\0\0")
    for sid in sorted(out, key=lambda s: _ORDER[s]):
        result += bytes([sid]) + uleb(len(out[sid])) + out[sid]
    for sid, body in customs:
        result += bytes([sid]) + uleb(len(body)) + body
    return bytes(result)


def build(policy: str, *, minor: int | None = 3, major: int = 1, defines: tuple[str, ...] = (),
          cache_dir: Path | None = None) -> bytes:
    """Compile ``agent_devkit/opa/<policy>.c`` with the runtime into an ABI 1.<minor> module (cached)."""
    sources = [HERE / "opa_rt.c", HERE / f"{policy}.c"]
    exports = list(BASE_EXPORTS)
    for m, names in MINOR_EXPORTS.items():
        if minor is not None and minor >= m:
            exports += names
    exports.append("opa_rt_init")
    key = hashlib.sha256(b"".join(s.read_bytes() for s in [*sources, HERE / "opa_rt.h", Path(__file__)])
                         + repr((policy, minor, major, defines)).encode()).hexdigest()[:20]
    cache = cache_dir or Path(tempfile.gettempdir()) / "edge-agent-test-policies"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{policy}-{key}.wasm"
    if target.exists():
        return target.read_bytes()
    clang = shutil.which("clang")
    if clang is None:
        raise RuntimeError("clang is needed to build the test policies")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wasm"
        cmd = [clang, "--target=wasm32", "-nostdlib", "-O2", "-fno-builtin", "-Wall", "-Werror",
               "-Wno-unused-function", *[f"-D{d}" for d in defines], "-Wl,--no-entry",
               "-Wl,--import-memory", "-Wl,--strip-all",
               *[f"-Wl,--export={e}" for e in exports], "-o", str(raw), *map(str, sources)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        patched = patch(raw.read_bytes(), major=major, minor=minor,
                        export_memory=minor is not None and minor >= 1, start="opa_rt_init")
    tmp_target = target.with_suffix(f".{os.getpid()}.tmp")  # concurrent test runs: atomic publish
    tmp_target.write_bytes(patched)
    tmp_target.replace(target)
    return patched


if __name__ == "__main__":
    Path(sys.argv[2]).write_bytes(build(sys.argv[1]))
