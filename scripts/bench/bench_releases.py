"""Benchmark of signed releases: verification time, and cold start from the precompiled cache.

1. ``verify_release`` of a 150 kB and a 5 MB Wasm artifact (ECDSA P-256 and Ed25519): full check
   (signature, statement, digest, Wasm validation) and crypto+digest only.
2. Cold start of an installed ~140 kB policy-sized Wasm (code-heavy, like OPA output): load through
   ``codecache.load_module`` from the SQLite precompiled cache (fresh reader, MAC check, deserialize)
   vs compiling it. Target: <= 5 ms from cache and >= 20x faster than compiling.

Prints a table and writes ``var/bench/releases.json``. Usage: .venv/bin/python scripts/bench/bench_releases.py
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path

import wasmtime

from agent.daemon.releases import release_store
from agent.storage import Store
from agent.trust.keys import KeyType, generate
from agent.trust.signer import sign_release
from agent.trust.truststore import TrustedKey, TrustSet, add_key
from agent.trust.verify import verify_release
from agent.wasm import codecache
from agent.wasm.engine import WasmEngine

REPO = Path(__file__).resolve().parents[2]


def padded_wasm(size: int) -> bytes:
    """A valid module of ~size bytes: one function plus a passive data segment."""
    pad = max(0, size - 100)
    blob = "".join(f"\\{b:02x}" for b in (bytes(range(256)) * (pad // 256 + 1))[:pad])
    return bytes(wasmtime.wat2wasm(f'(module (func (export "run")) (memory 1) (data "{blob}"))'))


def policy_sized_wasm(target: int = 140_000) -> bytes:
    """A code-heavy module (many functions with branches and calls, like OPA's compiled Rego)."""
    funcs: list[str] = []
    i = 0
    while True:
        funcs.append(
            f"(func $f{i} (param $a i32) (param $b i32) (result i32) (local $t i32)\n"
            f" (local.set $t (i32.add (local.get $a) (i32.const {i})))\n"
            f" (if (i32.gt_s (local.get $t) (local.get $b))\n"
            f"  (then (local.set $t (i32.mul (local.get $t) (i32.const 3))))\n"
            f"  (else (local.set $t (i32.xor (local.get $t) (i32.const {i * 7 + 1})))))\n"
            f" (block $out (loop $l (br_if $out (i32.ge_u (local.get $b) (i32.const 4)))"
            f" (local.set $b (i32.add (local.get $b) (i32.const 1))) (br $l)))\n"
            + (f" (local.set $t (call $f{i - 1} (local.get $t) (local.get $b)))\n" if i and i % 4 else "")
            + " (local.get $t))")
        i += 1
        if i % 50 == 0:
            wasm = bytes(wasmtime.wat2wasm(
                "(module (memory (export \"memory\") 2)\n" + "\n".join(funcs)
                + f'\n(export "eval" (func $f{i - 1})) (func (export "_start")))'))
            if len(wasm) >= target:
                return wasm


_CHILD = """
import sys, time
from pathlib import Path
from agent.wasm import codecache
from agent.wasm.engine import WasmEngine
from agent.storage.db import connect_reader
engine = WasmEngine()
def miss():
    raise SystemExit("cache miss")
t0 = time.perf_counter()
conn = connect_reader(Path(sys.argv[1]))
codecache.load_module(conn, engine, sys.argv[2], miss)
print((time.perf_counter() - t0) * 1000)
"""


def fresh_process_load(db: Path, sha256: str) -> float:
    """Load from the cache in a brand-new process (as after a reboot): open reader + MAC + deserialize."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(db), sha256], capture_output=True, text=True,
                         cwd=REPO, check=True, timeout=60)
    return float(out.stdout.strip().splitlines()[-1])


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    results: dict[str, object] = {"machine": platform.machine(), "python": platform.python_version(),
                                  "wasmtime": version("wasmtime")}
    rows: list[tuple[str, str]] = []
    now = time.time()
    verify: dict[str, dict[str, float]] = {}
    key_types: tuple[KeyType, ...] = ("ecdsa-p256", "ed25519")
    for key_type in key_types:
        key = generate(key_type)
        trust = TrustSet((TrustedKey(public=key.public),))
        for label, size in (("150kB", 150_000), ("5MB", 5_000_000)):
            art = padded_wasm(size)
            bundle = sign_release(key, art, "module", "bench", 1)
            verify_release(art, bundle, trust, None, now)  # warm-up
            full = statistics.median(timed(partial(verify_release, art, bundle, trust, None, now), 15))
            crypto = statistics.median(timed(partial(verify_release, art, bundle, trust, None, now,
                                                     check_content=False), 15))
            name = f"{key_type}/{label}"
            verify[name] = {"bytes": len(art), "full_ms": round(full, 3), "signature_digest_ms": round(crypto, 3)}
            rows.append((f"verify {name} ({len(art)} B) full", f"{full:.2f} ms"))
            rows.append((f"verify {name} signature+digest only", f"{crypto:.2f} ms"))
    results["verify"] = verify

    wasm = policy_sized_wasm()
    with tempfile.TemporaryDirectory(prefix="bench-releases-") as tmp:
        store = Store.open(Path(tmp) / "state")
        try:
            key = generate("ecdsa-p256")
            store.writer.run_sync(add_key(TrustedKey(public=key.public)))
            # installed as a module: it is policy-*sized* code, not OPA output, and install now checks that
            # the runtime can run what it stores (a WASI command with _start); the cache is kind-agnostic
            rel = release_store(store).install(wasm, sign_release(key, wasm, "module", "bench-policy", 1))
            engine = WasmEngine()
            compile_ms = timed(lambda: engine.compile(wasm), 5)
            codecache.load_module(store, engine, rel.sha256, lambda: wasm)  # cached by install already

            def from_cache() -> None:
                conn = store.reader()
                try:
                    def miss() -> bytes:
                        raise AssertionError("cache miss during the benchmark")
                    codecache.load_module(conn, engine, rel.sha256, miss)
                finally:
                    conn.close()
            cache_ms = timed(from_cache, 30)
            module = codecache.load_module(store, engine, rel.sha256, lambda: wasm)
            inst_ms = timed(lambda: wasmtime.Instance(engine.new_store(), module, []), 30)
            fresh_ms = [fresh_process_load(store.path, rel.sha256) for _ in range(5)]
            # the gateway-side verify (signature … + "can this agent run it?"): compiled code cached vs not
            rs = release_store(store)
            other = sign_release(key, wasm, "module", "bench-other", 1)
            check_hit_ms = timed(lambda: rs.verify(wasm, other), 10)
            fresh = [wasm + bytes([0, 5, 3]) + b"p" + i.to_bytes(3, "big") for i in range(3)]  # new sha each
            check_miss_ms = timed(lambda: rs.verify((b := fresh.pop()),
                                                    sign_release(key, b, "module", "bench-other", 1)), 3)
        finally:
            store.close()
    c_med, k_med, k_first = statistics.median(compile_ms), statistics.median(cache_ms), cache_ms[0]
    speedup = c_med / k_med
    results["cold_start"] = {
        "wasm_bytes": len(wasm), "compile_ms_median": round(c_med, 3), "cache_load_ms_median": round(k_med, 3),
        "cache_load_ms_first": round(k_first, 3), "cache_load_ms_max": round(max(cache_ms), 3),
        "instantiate_ms_median": round(statistics.median(inst_ms), 3), "speedup": round(speedup, 1),
        "fresh_process_cache_load_ms_median": round(statistics.median(fresh_ms), 3),
        "target_cache_ms": 5.0, "target_speedup": 20.0,
        "store_verify_cache_hit_ms_median": round(statistics.median(check_hit_ms), 3),
        "store_verify_compile_ms_median": round(statistics.median(check_miss_ms), 3),
        "meets_target": k_med <= 5.0 and speedup >= 20.0,
    }
    rows += [
        (f"policy-sized wasm ({len(wasm)} B): compile (median of 5)", f"{c_med:.1f} ms"),
        ("  load from SQLite precompiled cache (median of 30)", f"{k_med:.2f} ms (first {k_first:.2f} ms)"),
        ("  load from cache in a fresh process (median of 5)", f"{statistics.median(fresh_ms):.2f} ms"),
        ("  instantiate (median)", f"{statistics.median(inst_ms):.2f} ms"),
        ("  speedup cache vs compile", f"{speedup:.0f}x (target >= 20x, <= 5 ms)"),
        ("  install-time verify incl. runnable check, code cached",
         f"{statistics.median(check_hit_ms):.2f} ms"),
        ("  install-time verify incl. runnable check, compiling", f"{statistics.median(check_miss_ms):.1f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measurement'.ljust(width)}  result")
    print(f"{'-' * width}  ------")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    out = REPO / "var" / "bench" / "releases.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
