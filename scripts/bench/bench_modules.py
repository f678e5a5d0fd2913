"""Benchmark the module runtime: cold start from the precompiled cache vs compiling, and run latency.

Usage: .venv/bin/python scripts/bench/bench_modules.py [--runs N]
Prints a table and writes var/bench/modules.json. Uses the real example modules (built first),
a real SQLite state dir (temporary) and the shared engine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.config.modules import ModuleSettings
from agent.runtime.modules import ModuleRuntime
from agent.runtime.runner import Limits, ModuleRunner
from agent.storage import Store
from agent.wasm import codecache
from agent.wasm.engine import shared_engine

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "examples" / "build"


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(pct(values, 50), 3), "p99_ms": round(pct(values, 99), 3),
            "mean_ms": round(statistics.fmean(values), 3), "n": len(values)}


def readings(n: int) -> list[dict[str, Any]]:
    now = time.time()
    return [{"device": f"l1/s{i % 8}", "metric": "temp", "value": 20.0 + (i % 15), "wall": now - n + i,
             "topic": f"factory/l1/s{i % 8}/temp"} for i in range(n)]


def cold_start(state: Path, name: str, runs: int) -> dict[str, Any]:
    engine = shared_engine()
    wasm = (BUILD / f"{name}.wasm").read_bytes()
    sha = hashlib.sha256(wasm).hexdigest()
    compile_ms, cache_ms, deser_ms, first_run_ms = [], [], [], []
    runner = ModuleRunner(engine)
    stdin = json.dumps({"trigger": {"kind": "manual"}, "readings": readings(10), "config": {}, "state": None},
                       separators=(",", ":")).encode()
    limits = Limits(1.0, 32 << 20, 256 << 10)
    store = Store.open(state)
    try:
        codecache.load_module(store, engine, sha, lambda: wasm)  # fill the cache (as the first install does)
        code = engine.serialize(engine.compile(wasm))
        for _ in range(runs):
            t = time.perf_counter()
            engine.compile(wasm)
            compile_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            engine.deserialize(code)
            deser_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            conn = store.reader()
            module = codecache.lookup(conn, engine, sha)
            conn.close()
            cache_ms.append((time.perf_counter() - t) * 1000)
            assert module is not None
            t = time.perf_counter()
            result = runner.execute(module, stdin, limits)
            first_run_ms.append((time.perf_counter() - t) * 1000)
            assert result.ok, result.error
    finally:
        store.close()
    c, k = statistics.median(compile_ms), statistics.median(cache_ms)
    return {"module": name, "wasm_bytes": len(wasm), "precompiled_bytes": len(code),
            "compile": summary(compile_ms), "cache_load": summary(cache_ms), "deserialize": summary(deser_ms),
            "first_run_after_cache_load": summary(first_run_ms), "speedup_cache_vs_compile": round(c / k, 1)}


async def run_latency(state: Path, name: str, config: dict[str, Any], n_readings: int, runs: int) -> dict[str, Any]:
    store = Store.open(state)
    rt = ModuleRuntime(store, ModuleSettings(), state_dir=state)
    try:
        wasm = (BUILD / f"{name}.wasm").read_bytes()
        await rt.load_release(name, 1, hashlib.sha256(wasm).hexdigest(), wasm, {"config": config})
        batch = readings(n_readings)
        loaded = rt.registry.get(name)
        assert loaded is not None
        stdin = json.dumps({"trigger": {"kind": "manual"}, "readings": batch, "config": config, "state": None},
                           separators=(",", ":")).encode()
        raw_ms, full_ms = [], []
        for _ in range(runs):
            t = time.perf_counter()
            res = rt.runner.execute(loaded.module, stdin, Limits(1.0, 32 << 20, 256 << 10))
            raw_ms.append((time.perf_counter() - t) * 1000)
            assert res.ok
            t = time.perf_counter()
            await rt.run(name, readings=batch)
            full_ms.append((time.perf_counter() - t) * 1000)
        return {"module": name, "readings": n_readings, "sandboxed_run": summary(raw_ms),
                "runtime_run_recorded": summary(full_ms)}
    finally:
        await rt.close()
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    subprocess.run(["bash", str(REPO / "scripts" / "build-examples.sh")], check=True, cwd=REPO)
    results: dict[str, Any] = {"cold_start": [], "run_latency": []}
    with tempfile.TemporaryDirectory(prefix="bench-modules-") as tmp:
        for name in ("thermostat", "moving_avg", "counter"):
            results["cold_start"].append(cold_start(Path(tmp) / f"cs-{name}", name, max(20, args.runs // 5)))
        thermo = {"metric": "temp", "high": 30, "low": 27}
        for name, cfg, n in (("counter", {}, 0), ("thermostat", thermo, 10), ("thermostat", thermo, 100),
                             ("moving_avg", {"metric": "temp"}, 100)):
            results["run_latency"].append(asyncio.run(run_latency(Path(tmp) / f"rl-{name}-{n}", name, cfg, n,
                                                                  args.runs)))
    print("\nModule cold start (ms, median of runs): compile vs load from the precompiled cache")
    print(f"{'module':<12}{'wasm B':>8}{'compile':>10}{'cache load':>12}{'deserialize':>13}{'1st run':>9}"
          f"{'speedup':>9}")
    for r in results["cold_start"]:
        print(f"{r['module']:<12}{r['wasm_bytes']:>8}{r['compile']['p50_ms']:>10.2f}{r['cache_load']['p50_ms']:>12.2f}"
              f"{r['deserialize']['p50_ms']:>13.2f}{r['first_run_after_cache_load']['p50_ms']:>9.2f}"
              f"{r['speedup_cache_vs_compile']:>8.1f}x")
    print("\nRun latency (ms): sandboxed run alone, and runtime.run (input, run, validate, record in SQLite)")
    print(f"{'module':<12}{'readings':>9}{'run p50':>9}{'run p99':>9}{'recorded p50':>14}{'recorded p99':>14}")
    for r in results["run_latency"]:
        print(f"{r['module']:<12}{r['readings']:>9}{r['sandboxed_run']['p50_ms']:>9.2f}"
              f"{r['sandboxed_run']['p99_ms']:>9.2f}{r['runtime_run_recorded']['p50_ms']:>14.2f}"
              f"{r['runtime_run_recorded']['p99_ms']:>14.2f}")
    out = REPO / "var" / "bench" / "modules.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
