"""Policy engine benchmark: edge-agent vs opa-py-wasm vs the official JS SDK, same module, same inputs.

No OPA compiler exists here, so the policy is the ABI-conformant RBAC module built from
tests/policies/rbac.c (OPA's RBAC example: data + package entrypoint returning an object). Each host
runs in one process, one after another; opa-py-wasm runs in its own venv (it pins wasmtime 46), the
JS SDK under node. Every host's result sets are checked against ours before timing counts.

Usage: .venv/bin/python scripts/bench/bench_policy.py [--evals 20000] [--throughput 100000]
Writes var/bench/policy.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from agent_devkit.opa.build import RBAC_DATA, build

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "var" / "bench"
WORK = OUT / "policy"
OPAPY_VENV = OUT / "venv-opapy"
NODE_DIR = OUT / "node"

INPUTS = [{"user": "bob", "action": "read", "type": "finance"},
          {"user": "alice", "action": "delete", "type": "dog"},
          {"user": "eve", "action": "update", "type": "cat"},
          {"user": "mallory", "action": "read", "type": "dog"}]
ENTRYPOINT = "app/rbac"


def stats(ns: list[int]) -> dict[str, float]:
    s = sorted(ns)
    n = len(s)
    return {"n": n, "p50_us": s[n // 2] / 1000, "p99_us": s[min(n - 1, int(n * 0.99))] / 1000,
            "p999_us": s[min(n - 1, int(n * 0.999))] / 1000, "mean_us": sum(s) / n / 1000}


OPAPY_SCRIPT = r"""
import json, sys, time
from opapywasm import OpaWasmPolicy, PolicyConfig

wasm, ep, n = sys.argv[1], sys.argv[4], int(sys.argv[5])
data, inputs = json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
p = OpaWasmPolicy.from_wasm_file(wasm, PolicyConfig(pool_size=1))
p.set_data(data)
results = [p.evaluate_raw(i, ep) for i in inputs]
for k in range(2000):
    p.evaluate_raw(inputs[k % len(inputs)], ep)
ts = []
pc = time.perf_counter_ns
for k in range(n):
    doc = inputs[k % len(inputs)]
    t = pc(); p.evaluate_raw(doc, ep); ts.append(pc() - t)
print(json.dumps({"results": results, "ns": ts}))
"""

NODE_SCRIPT = r"""
const { loadPolicy } = require("@open-policy-agent/opa-wasm");
const fs = require("fs");
const [wasm, dataF, inputsF, ep, nS] = process.argv.slice(2);
(async () => {
  const p = await loadPolicy(fs.readFileSync(wasm));
  p.setData(JSON.parse(fs.readFileSync(dataF)));
  const inputs = JSON.parse(fs.readFileSync(inputsF));
  const results = inputs.map((i) => p.evaluate(i, ep));
  for (let k = 0; k < 5000; k++) p.evaluate(inputs[k % inputs.length], ep);
  const n = parseInt(nS); const ts = new Array(n);
  for (let k = 0; k < n; k++) {
    const doc = inputs[k % inputs.length];
    const t = process.hrtime.bigint(); p.evaluate(doc, ep); ts[k] = Number(process.hrtime.bigint() - t);
  }
  console.log(JSON.stringify({ results, ns: ts }));
})().catch((e) => { console.error(e); process.exit(1); });
"""


def bench_ours(wasm: bytes, n: int, fast: bool) -> tuple[list[Any], dict[str, float]]:
    from agent.config.policy import PolicySettings
    from agent.policy.engine import load_policy
    p = load_policy(wasm, data=RBAC_DATA, settings=PolicySettings(fast_calls=fast))
    results = [p.evaluate(i, ENTRYPOINT).raw for i in INPUTS]
    for k in range(2000):
        p.evaluate(INPUTS[k % len(INPUTS)], ENTRYPOINT)
    ts = []
    pc = time.perf_counter_ns
    ev = p.evaluate
    for k in range(n):
        doc = INPUTS[k % len(INPUTS)]
        t = pc()
        ev(doc, ENTRYPOINT)
        ts.append(pc() - t)
    return results, stats(ts)


def bench_floor(wasm: bytes, n: int = 20000) -> dict[str, float]:
    """One trivial guest call (opa_heap_ptr_get) through the public API and through the fast path."""
    from agent.policy.engine import load_policy
    from agent.wasm.calls import FastCalls, PublicCalls, fast_path
    p = load_policy(wasm, data=RBAC_DATA)
    inst = p._idle[0]  # noqa: SLF001 - the benchmark times one instance's calls directly
    path = fast_path()
    if path is None:
        raise SystemExit("the fast call path is not available with this wasmtime-py (see wasm_shim_fallback)")
    out: dict[str, float] = {}
    for label, calls in (("public_call_us", PublicCalls(inst.store, inst.memory, inst.funcs)),
                         ("fast_call_us", FastCalls(inst.store, inst.memory, inst.funcs, path))):
        call = calls.call
        for _ in range(1000):
            call("opa_heap_ptr_get")
        ts = []
        pc = time.perf_counter_ns
        for _ in range(n):
            t = pc()
            call("opa_heap_ptr_get")
            ts.append(pc() - t)
        out[label] = stats(ts)["p50_us"]
    return out


def run_opapy(wasm_path: Path, data_path: Path, inputs_path: Path, n: int) -> dict[str, Any] | None:
    py = OPAPY_VENV / "bin" / "python"
    if not py.exists():
        print(f"opa-py-wasm venv missing: python3.11 -m venv {OPAPY_VENV} && {py.parent}/pip install opa-py-wasm")
        return None
    script = WORK / "opapy_bench.py"
    script.write_text(OPAPY_SCRIPT)
    proc = subprocess.run([str(py), str(script), str(wasm_path), str(data_path), str(inputs_path), ENTRYPOINT,
                           str(n)], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        print("opa-py-wasm failed:", proc.stderr[-2000:])
        return None
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"results": doc["results"], **stats(doc["ns"])}


def run_node(wasm_path: Path, data_path: Path, inputs_path: Path, n: int) -> dict[str, Any] | None:
    node = shutil.which("node")
    sdk = NODE_DIR / "node_modules" / "@open-policy-agent" / "opa-wasm"
    if node is None or not sdk.exists():
        print(f"node or the JS SDK missing (npm install @open-policy-agent/opa-wasm in {NODE_DIR})")
        return None
    script = NODE_DIR / "bench.cjs"
    script.write_text(NODE_SCRIPT)
    proc = subprocess.run([node, str(script), str(wasm_path), str(data_path), str(inputs_path), ENTRYPOINT, str(n)],
                          capture_output=True, text=True, timeout=900, cwd=NODE_DIR, check=False)
    if proc.returncode != 0:
        print("node SDK failed:", proc.stderr[-2000:])
        return None
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"results": doc["results"], **stats(doc["ns"])}


def run_throughput(wasm_path: Path, data_path: Path, count: int) -> dict[str, Any]:
    inputs = WORK / f"inputs-{count}.jsonl"
    if not inputs.exists():
        with inputs.open("w") as f:
            for k in range(count):
                f.write(json.dumps(INPUTS[k % len(INPUTS)]) + "\n")
    exe = ROOT / ".venv" / "bin" / "edge-agent"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agent.cli.agent_main"]
    out_path = WORK / "throughput-out.jsonl"
    started = time.perf_counter()
    with out_path.open("wb") as out:
        proc = subprocess.run([*cmd, "policy", "eval", str(wasm_path), "--data", str(data_path), "--entrypoint",
                               ENTRYPOINT, "--inputs", str(inputs)], stdout=out, stderr=subprocess.PIPE,
                              timeout=1800, cwd=ROOT,
                              check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"policy eval --inputs failed: {proc.stderr.decode()[-2000:]}")
    lines = sum(1 for _ in out_path.open("rb"))
    assert lines == count, (lines, count)
    return {"inputs": count, "seconds": round(elapsed, 3), "evals_per_s": round(count / elapsed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--evals", type=int, default=20000)
    ap.add_argument("--throughput", type=int, default=100000)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    wasm = build("rbac")
    wasm_path, data_path, inputs_path = WORK / "rbac.wasm", WORK / "data.json", WORK / "inputs.json"
    wasm_path.write_bytes(wasm)
    data_path.write_text(json.dumps(RBAC_DATA))
    inputs_path.write_text(json.dumps(INPUTS))

    ours_results, ours = bench_ours(wasm, args.evals, fast=True)
    _, public = bench_ours(wasm, max(2000, args.evals // 5), fast=False)
    floor = bench_floor(wasm)
    opapy = run_opapy(wasm_path, data_path, inputs_path, args.evals)
    node = run_node(wasm_path, data_path, inputs_path, args.evals)
    for label, other in (("opa-py-wasm", opapy), ("js-sdk", node)):
        if other is not None and other.pop("results") != ours_results:
            raise SystemExit(f"{label} result sets differ from edge-agent's: benchmark invalid")
    throughput = run_throughput(wasm_path, data_path, args.throughput)

    rows: list[tuple[str, dict[str, Any] | None]] = [("edge-agent (fast path)", ours),
                                                      ("edge-agent (public API fallback)", public),
                                                      ("opa-py-wasm 1.2.1 (wasmtime 46)", opapy),
                                                      ("JS SDK @open-policy-agent/opa-wasm (node)", node)]
    print(f"\npolicy: tests/policies/rbac.c (ABI 1.3), entrypoint {ENTRYPOINT} (object), {args.evals} evals/host\n")
    print(f"{'host':44} {'p50 µs':>9} {'p99 µs':>9} {'p99.9 µs':>9} {'vs opa-py-wasm p50':>20}")
    for name, r in rows:
        if r is None:
            print(f"{name:44} {'n/a':>9}")
            continue
        ratio = f"{opapy['p50_us'] / r['p50_us']:.1f}x faster" if opapy else "n/a"
        print(f"{name:44} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['p999_us']:9.1f} {ratio:>20}")
    print(f"\nthroughput: 'edge-agent policy eval --inputs' {throughput['inputs']} inputs in "
          f"{throughput['seconds']} s (whole process) = {throughput['evals_per_s']} evals/s")
    print(f"floor (one trivial guest call, p50): public Func.__call__ {floor['public_call_us']:.2f} µs, "
          f"fast path {floor['fast_call_us']:.2f} µs")
    result = {"policy": "tests/policies/rbac.c", "entrypoint": ENTRYPOINT, "evals_per_host": args.evals,
              "machine": {"cpu_count": os.cpu_count(), "machine": platform.machine(),
                          "python": platform.python_version()},
              "edge_agent_fast": ours, "edge_agent_public": public, "opa_py_wasm": opapy, "js_sdk": node,
              "ratio_p50_vs_opa_py_wasm": round(opapy["p50_us"] / ours["p50_us"], 2) if opapy else None,
              "throughput_policy_eval_inputs": throughput, "floor": floor,
              "targets": {"p50_ratio_ge": 10, "p99_us_le": 70}}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "policy.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {OUT / 'policy.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
