"""Link a small hand-planned policy against OPA's REAL Wasm runtime, the way ``opa build -t wasm`` does.

``opa-runtime-v1.20.2.wasm.gz`` is OPA's own runtime library (``internal/compiler/wasm/opa/opa.wasm``:
value model, allocator, JSON, libmpdec, RE2, ``opa_eval``, heap stash), byte-for-byte as OPA v1.20.2
embeds it; see README.md for where it came from. OPA's Wasm backend (``internal/compiler/wasm/wasm.go``)
turns it into a policy module in these stages, which :func:`link` repeats:

* initModule: drop the ``__heap_base`` export; add a zero data segment up to ``__heap_base``;
* compileStringsAndBooleans: one data segment with the string constants, interned booleans
  (type 9) and entrypoint/builtin names;
* addImportMemoryDecl: the module's own memory becomes ``env.memory`` (min = pages of the data);
* compileExternalFuncDecls / compileEntrypointDecls: ``builtins()`` / ``entrypoints()`` build their
  objects with ``opa_object`` + ``opa_string_terminated`` + ``opa_number_int`` + ``opa_object_insert``;
* emitMappingAndStartFunc: a ``_initialize`` start function: ``opa_malloc_init(heap_base)``,
  ``opa_mpd_init()``, ``opa_mapping_init(json, len)``;
* replaceBooleanFunc: ``opa_boolean`` returns one of the interned booleans;
* compilePlans: ``eval(ctx)``: ``opa_memoize_init``, input = ctx[0], data = ctx[4], result set =
  ``opa_set()`` stored at ctx[8], entrypoint id = ctx[12], one block per plan, else
  ``opa_abort("internal: illegal entrypoint id")``;
* emitABIVersionGlobals: ``opa_wasm_abi_version`` = 1, ``opa_wasm_abi_minor_version`` = 3.

Only the plans are written by hand here (OPA's planner would generate them from Rego). They are
the plans of this Rego, in the statement shapes the backend emits (DotStmt → ``opa_value_get`` +
``br_if``, EqualStmt → ``opa_value_compare``, CallStmt of a host builtin → ``opa_builtinN``)::

    package real
    echo := input                                     # real/echo
    default allow := false                            # real/allow
    allow if input.user == data.admin
    lookup := data.table[input.key]                   # real/lookup
    fmt := sprintf("%s/%d", [input.name, input.n])    # real/fmt  (host builtin sprintf, id 0)
    conflict := ... # a runtime error: opa_abort      # real/conflict
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

from agent_devkit.opa.build import read_name, read_uleb, sections, sleb, uleb

HERE = Path(__file__).resolve().parent

RUNTIME = HERE / "opa-runtime-v1.20.2.wasm.gz"
ENTRYPOINTS = ["real/echo", "real/allow", "real/lookup", "real/fmt", "real/conflict"]
BUILTINS = {"sprintf": 0}
CONFLICT_MSG = "real.rego:6: eval_conflict_error: complete rules must not produce multiple outputs"
OPA_TYPE_BOOLEAN_INTERNED = 9

# opcodes
CALL, LGET, LSET, LTEE, I32C, I64C, BLOCK, END, BR, BRIF = 0x10, 0x20, 0x21, 0x22, 0x41, 0x42, 0x02, 0x0B, 0x0C, 0x0D
I32NE, I32EQZ, SELECT, UNREACHABLE, I32LOAD, I32STORE = 0x47, 0x45, 0x1B, 0x00, 0x28, 0x36


def _vec(items: list[bytes]) -> bytes:
    return uleb(len(items)) + b"".join(items)


def _str(s: str) -> bytes:
    return uleb(len(s.encode())) + s.encode()


def _split_entries(body: bytes, parse_one: object) -> list[bytes]:
    count, pos = read_uleb(body, 0)
    out = []
    for _ in range(count):
        end = parse_one(body, pos)  # type: ignore[operator]
        out.append(body[pos:end])
        pos = end
    return out


def _import_end(b: bytes, p: int) -> int:
    _, p = read_name(b, p)
    _, p = read_name(b, p)
    kind = b[p]
    p += 1
    if kind == 0:
        _, p = read_uleb(b, p)
    elif kind in (1, 2):
        if kind == 1:
            p += 1
        flag, p = read_uleb(b, p)
        _, p = read_uleb(b, p)
        if flag & 1:
            _, p = read_uleb(b, p)
    else:
        p += 2
    return p


def _export_end(b: bytes, p: int) -> int:
    _, p = read_name(b, p)
    _, p = read_uleb(b, p + 1)
    return p


def _code_end(b: bytes, p: int) -> int:
    size, p = read_uleb(b, p)
    return p + size


def _data_end(b: bytes, p: int) -> int:
    flag, p = read_uleb(b, p)
    assert flag == 0, "only active segments for memory 0"
    while b[p] != END:
        p += 1
    p += 1
    size, p = read_uleb(b, p)
    return p + size


def _data_extent(seg: bytes) -> int:
    _, p = read_uleb(seg, 0)
    assert seg[p] == I32C
    off, q = read_uleb(seg, p + 1)  # offsets here are small positive: uleb == sleb
    assert seg[q] == END
    size, _ = read_uleb(seg, q + 1)
    return off + size


def _data_seg(offset: int, data: bytes) -> bytes:
    return b"\x00" + bytes([I32C]) + sleb(offset) + bytes([END]) + uleb(len(data)) + data


def _func_body(locals_i32: int, code: bytes) -> bytes:
    body = (_vec([uleb(locals_i32) + b"\x7f"]) if locals_i32 else uleb(0)) + code + bytes([END])
    return uleb(len(body)) + body


def link(minor: int = 3) -> bytes:
    """Build the policy module (bytes) from the real runtime."""
    wasm = gzip.decompress(RUNTIME.read_bytes())
    secs = sections(wasm)
    by_id = {sid: body for sid, body in secs if sid != 0}
    names: dict[str, int] = {}
    for sid, body in secs:
        if sid == 0 and read_name(body, 0)[0] == "name":
            pos = read_name(body, 0)[1]
            while pos < len(body):
                sub = body[pos]
                size, pos2 = read_uleb(body, pos + 1)
                if sub == 1:
                    cnt, q = read_uleb(body, pos2)
                    for _ in range(cnt):
                        idx, q = read_uleb(body, q)
                        nm, q = read_name(body, q)
                        names.setdefault(nm, idx)
                pos = pos2 + size

    def fn(name: str) -> bytes:
        return bytes([CALL]) + uleb(names[name])

    # types: find or add ()->i32 and ()->()
    type_entries = _split_entries(by_id[1], _type_end)
    def type_idx(sig: bytes) -> int:
        if sig not in type_entries:
            type_entries.append(sig)
        return type_entries.index(sig)
    t_void_i32 = type_idx(b"\x60\x00\x01\x7f")
    t_void_void = type_idx(b"\x60\x00\x00")

    imports = _split_entries(by_id[2], _import_end)
    n_func_imports = len(imports)  # all function imports (opa_builtin0..4, opa_abort)
    funcs = _split_entries(by_id[3], lambda b, p: read_uleb(b, p)[1])
    codes = _split_entries(by_id[10], _code_end)
    exports = _split_entries(by_id[7], _export_end)
    datas = _split_entries(by_id[11], _data_end)
    gcount, gpos = read_uleb(by_id[6], 0)
    gbody = by_id[6][gpos:]

    # initModule: __heap_base -> zero segment; drop its export
    heap_base_global = None
    kept_exports = []
    for e in exports:
        nm, p = read_name(e, 0)
        if nm == "__heap_base":
            heap_base_global, _ = read_uleb(e, p + 1)
        else:
            kept_exports.append(e)
    assert heap_base_global is not None
    # globals are "7f mut 41 <sleb> 0b" each; read the heap base's init value
    p = 0
    heap_base = 0
    for i in range(gcount):
        assert gbody[p] == 0x7F and gbody[p + 2] == I32C
        q = p + 3
        result = shift = 0
        while True:
            byte = gbody[q]
            q += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if i == heap_base_global:
            heap_base = result
        p = q + 1
    lowest = max(_data_extent(d) for d in datas)
    datas.append(_data_seg(lowest, bytes(heap_base - lowest)))

    # compileStringsAndBooleans
    string_off = max(_data_extent(d) for d in datas)
    buf = bytearray()
    addr: dict[str, int] = {}

    def put(key: str, blob: bytes) -> None:
        addr[key] = string_off + len(buf)
        buf.extend(blob)

    for text in ("result", "user", "admin", "table", "key", "name", "n", "%s/%d", CONFLICT_MSG,
                 "var assignment conflict", "object insert conflict", "internal: illegal entrypoint id"):
        put("s:" + text, text.encode() + b"\0")
    put("bool:true", bytes([OPA_TYPE_BOOLEAN_INTERNED, 1]))
    put("bool:false", bytes([OPA_TYPE_BOOLEAN_INTERNED, 0]))
    for bname in BUILTINS:
        put("b:" + bname, bname.encode() + b"\0")
    for ename in ENTRYPOINTS:
        put("e:" + ename, ename.encode() + b"\0")
    datas.append(_data_seg(string_off, bytes(buf)))

    # emitMappingAndStartFunc: mapping JSON (no policy functions) + _initialize
    mapping = b"{}"
    mapping_off = max(_data_extent(d) for d in datas)
    datas.append(_data_seg(mapping_off, mapping))
    heap_start = max(_data_extent(d) for d in datas)
    pages = -(-heap_start // 65536)
    imports.append(_str("env") + _str("memory") + b"\x02\x00" + uleb(pages))  # addImportMemoryDecl

    def s(key: str) -> bytes:
        return bytes([I32C]) + sleb(addr["s:" + key])

    def new_obj_map(keys: dict[str, int], prefix: str) -> bytes:
        code = fn("opa_object") + bytes([LSET, 0])
        for k, v in keys.items():
            code += bytes([LGET, 0, I32C]) + sleb(addr[prefix + k]) + fn("opa_string_terminated")
            code += bytes([I64C]) + sleb(v) + fn("opa_number_int") + fn("opa_object_insert")
        return code + bytes([LGET, 0])

    builtins_code = _func_body(1, new_obj_map(BUILTINS, "b:"))
    entrypoints_code = _func_body(1, new_obj_map({e: i for i, e in enumerate(ENTRYPOINTS)}, "e:"))
    init_code = _func_body(0, bytes([I32C]) + sleb(heap_start) + fn("opa_malloc_init") + fn("opa_mpd_init")
                           + bytes([I32C]) + sleb(mapping_off) + bytes([I32C]) + sleb(len(mapping))
                           + fn("opa_mapping_init"))
    boolean_code = _func_body(0, bytes([I32C]) + sleb(addr["bool:true"]) + bytes([I32C])
                              + sleb(addr["bool:false"]) + bytes([LGET, 0, SELECT]))

    # compilePlans: eval(ctx) with locals rs=1, eid=2, input=3, data=4, t=5, u=6
    ctx, rs, eid, inp, dat, t, u = 0, 1, 2, 3, 4, 5, 6

    def add_result(value_local: int) -> bytes:  # ResultSetAddStmt of {"result": local}
        return (fn("opa_object") + bytes([LSET, u, LGET, u]) + s("result") + fn("opa_string_terminated")
                + bytes([LGET, value_local]) + fn("opa_object_insert") + bytes([LGET, rs, LGET, u]) + fn("opa_set_add"))

    def dot(src: int, key: str, target: int) -> bytes:  # DotStmt: undefined -> leave the plan block
        return bytes([LGET, src, I32EQZ, BRIF, 0, LGET, src]) + s(key) + fn("opa_string_terminated") \
            + fn("opa_value_get") \
            + bytes([LTEE, target, I32EQZ, BRIF, 0])

    def block(code: bytes) -> bytes:
        return bytes([BLOCK, 0x40]) + code + bytes([END])

    plans = [
        # real/echo: input must be defined
        bytes([LGET, inp, I32EQZ, BRIF, 0]) + add_result(inp),
        # real/allow: default false; true if input.user == data.admin
        block(dot(inp, "user", t) + dot(dat, "admin", u) + bytes([LGET, t, LGET, u]) + fn("opa_value_compare")
              + bytes([BRIF, 0, I32C, 1]) + fn("opa_boolean") + bytes([LSET, t]) + add_result(t)
              + bytes([BR, 1]))
        + bytes([I32C, 0]) + fn("opa_boolean") + bytes([LSET, t]) + add_result(t),
        # real/lookup: data.table[input.key]
        dot(inp, "key", t) + dot(dat, "table", u) + bytes([LGET, u, LGET, t]) + fn("opa_value_get")
        + bytes([LTEE, t, I32EQZ, BRIF, 0]) + add_result(t),
        # real/fmt: sprintf("%s/%d", [input.name, input.n]) through the host (opa_builtin2, id 0, ctx 0)
        dot(inp, "name", t) + dot(inp, "n", u)
        + fn("opa_array") + bytes([LSET, 5 + 2])
        + bytes([LGET, 7, LGET, t]) + fn("opa_array_append") + bytes([LGET, 7, LGET, u]) + fn("opa_array_append")
        + bytes([I32C, 0, I32C, 0]) + s("%s/%d") + fn("opa_string_terminated") + bytes([LGET, 7, CALL, 2])
        + bytes([LTEE, t, I32EQZ, BRIF, 0]) + add_result(t),
        # real/conflict: a runtime error aborts the evaluation
        s(CONFLICT_MSG) + bytes([CALL, 5, UNREACHABLE]),
    ]
    main = b""
    for i, plan in enumerate(plans):
        main += block(bytes([LGET, eid, I32C]) + sleb(i) + bytes([I32NE, BRIF, 0]) + block(plan) + bytes([BR, 1]))
    main += s("internal: illegal entrypoint id") + bytes([CALL, 5, UNREACHABLE])
    eval_code = _func_body(7, fn("opa_memoize_init")
                           + bytes([LGET, ctx, I32LOAD, 2, 0, LSET, inp, LGET, ctx, I32LOAD, 2, 4, LSET, dat])
                           + fn("opa_set") + bytes([LSET, rs, LGET, ctx, LGET, rs, I32STORE, 2, 8])
                           + bytes([LGET, ctx, I32LOAD, 2, 12, LSET, eid]) + block(main) + bytes([I32C, 0]))

    codes[names["eval"] - n_func_imports] = eval_code
    codes[names["opa_boolean"] - n_func_imports] = boolean_code
    first_new = n_func_imports + len(funcs)
    funcs += [uleb(t_void_i32), uleb(t_void_i32), uleb(t_void_void)]
    codes += [builtins_code, entrypoints_code, init_code]
    idx_builtins, idx_entrypoints, idx_init = first_new, first_new + 1, first_new + 2

    gbody += b"\x7f\x00\x41" + sleb(1) + b"\x0b" + b"\x7f\x00\x41" + sleb(minor) + b"\x0b"
    kept_exports += [_str("eval") + b"\x00" + uleb(names["eval"]),
                     _str("builtins") + b"\x00" + uleb(idx_builtins),
                     _str("entrypoints") + b"\x00" + uleb(idx_entrypoints),
                     _str("opa_wasm_abi_version") + b"\x03" + uleb(gcount),
                     _str("opa_wasm_abi_minor_version") + b"\x03" + uleb(gcount + 1)]
    out = {1: _vec(type_entries), 2: _vec(imports), 3: _vec(funcs), 4: by_id[4], 6: uleb(gcount + 2) + gbody,
           7: _vec(kept_exports), 8: uleb(idx_init), 9: by_id[9], 10: _vec(codes), 11: _vec(datas)}
    module = bytearray(b"\0asm\x01\0\0\0")
    for sid in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11):
        module += bytes([sid]) + uleb(len(out[sid])) + out[sid]
    return bytes(module)


def _type_end(b: bytes, p: int) -> int:
    assert b[p] == 0x60
    n, p = read_uleb(b, p + 1)
    p += n
    n, p = read_uleb(b, p)
    return p + n


if __name__ == "__main__":
    Path(sys.argv[1]).write_bytes(link())
