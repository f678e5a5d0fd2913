"""Fleet benchmark: publish → active latency, evaluation latency during hot swaps, rollout convergence.

Everything real: one Mosquitto with mutual TLS and the shipped ACL, really-signed releases, the real
ReleaseStore (SQLite), OPA-ABI policies compiled from C with clang (a generated ~140 kB code-heavy
policy: compile cost like OPA output), the real PolicyRegistry.

1. publish → active: the manager publishes a 140 kB policy; the time until its status ``active``
   arrives back at the manager (verify, stage, compile, shadow on 200 recorded decisions, activate,
   swap, report). Target ≤ 300 ms.
2. evaluation latency during swaps vs steady state, under continuous load on the event loop (as the
   pipeline gate evaluates): p50/p99/max of each ``evaluate`` and the loop lag; zero failures.
   Target: p99 during swaps ≤ 2× steady.
3. rollout convergence: N simulated gateways in this one process, each its own mutual-TLS MQTT
   connection with a FleetLink + ReleaseReceiver: real envelope decode, real signature/digest/floor
   verification (``verify_release``), status published on its own topic. They skip the Wasm compile
   and the per-gateway SQLite (one shared store): on a real fleet that work runs in parallel on
   each device. Time from publish until ``edge-fleet rollout``'s aggregation shows all N active.
   Target: 500 in ≤ 10 s, cost linear in N.

Usage: .venv/bin/python scripts/bench/bench_fleet.py [--sizes 10,100,500] [--swaps 10]
Writes var/bench/fleet.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt

from agent import logs
from agent.fleet.envelope import encode
from agent.fleet.link import FleetLink, LinkConfig, client_kwargs
from agent.fleet.receiver import Delivery, ReleaseReceiver
from agent.fleet.reporter import ReleaseStatus, StatusReporter
from agent.fleet.rollout import Rollout
from agent.fleet.topics import Scope, Topics
from agent.offload import run_blocking
from agent.policy.engine import load_policy
from agent.policy.errors import PolicyEvalError
from agent.storage import Store
from agent.trust.predicate import RELEASE_PREDICATE_TYPE  # noqa: F401
from agent.trust.truststore import TrustSet
from agent.trust.verify import verify_release
from agent_devkit.broker import Broker, free_port
from agent_devkit.fleet import FleetWorld, custom_section, decisions_job, manager
from agent_devkit.opa.build import BASE_EXPORTS, HERE, MINOR_EXPORTS, patch
from agent_devkit.releases import Signer
from agent_devkit.tls import TestPKI, fleet_broker_conf

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "var" / "bench"
HERE_POLICIES = HERE  # the OPA-ABI runtime sources of the dev kit
NAME = "gate"
TOPICS = Topics()


# ------------------------------------------------------------------------------- the 140 kB policy

def big_policy(target: int = 140_000) -> bytes:
    """sandbox.c's entrypoints + generated rule functions (reachable through a table) → ~target bytes."""
    cache = Path(tempfile.gettempdir()) / "edge-agent-bench-fleet"
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"big-{target}.wasm"
    if out.exists():
        return out.read_bytes()
    n = 40
    while True:
        src = _generated_source(n)
        wasm = _compile([HERE_POLICIES / "opa_rt.c"], src)
        if len(wasm) >= target:
            out.write_bytes(wasm)
            return wasm
        n = int(n * max(1.1, target / max(1, len(wasm))))


def _generated_source(n: int) -> str:
    """An OPA-ABI policy (against tests/policies/opa_rt.c): ``big/rule`` dispatches to one of n generated
    rule functions (all reachable, so all compiled), ``ok/echo`` and ``bad/trap`` as in sandbox.c."""
    rules = []
    for i in range(n):
        rules.append(
            f"static value *rule{i}(value *input, value *data) {{\n"
            f"  value *x = obj_get(input, \"k{i % 7}\");\n"
            f"  int acc = {i};\n"
            f"  if (x && x->t == T_STR) for (int j = 0; j < x->len; j++) acc = acc * 31 + x->s[j] + {i * 3 + 1};\n"
            f"  if (acc % {i % 5 + 2} == 0) return mk_str(\"r{i}-even\");\n"
            f"  value *o = mk_obj(); obj_put(o, \"rule\", mk_num_int({i})); obj_put(o, \"acc\", mk_num_int(acc));\n"
            f"  if (data) {{ value *d = obj_get(data, \"limit{i % 3}\"); if (d) obj_put(o, \"limit\", d); }}\n"
            f"  return o;\n}}\n")
    table = "static value *(*RULES[])(value *, value *) = {" + ",".join(f"rule{i}" for i in range(n)) + "};\n"
    return ('#include "opa_rt.h"\n'
            'const char BUILTINS_JSON[] = "{}";\n'
            'const char ENTRYPOINTS_JSON[] = "{\\"big/rule\\":0,\\"ok/echo\\":1,\\"bad/trap\\":2}";\n'
            + "".join(rules) + table +
            "value *policy_eval(int ep, value *input, value *data) {\n"
            "  switch (ep) {\n"
            "  case 0: { value *r = obj_get(input, \"rule\"); int k = 0;\n"
            "    if (r && r->t == T_STR) for (int i = 0; i < r->len; i++) k = k * 10 + (r->s[i] - '0');\n"
            f"    return RULES[k % {n}](input, data); }}\n"
            "  case 1: return input;\n"
            "  case 2: __builtin_trap();\n"
            "  }\n  return 0;\n}\n")


def _compile(sources: list[Path], extra_src: str) -> bytes:
    exports = list(BASE_EXPORTS)
    for names in MINOR_EXPORTS.values():
        exports += names
    exports.append("opa_rt_init")
    clang = shutil.which("clang")
    if clang is None:
        raise SystemExit("clang is needed to build the benchmark policy")
    with tempfile.TemporaryDirectory() as tmp:
        gen = Path(tmp) / "big.c"
        gen.write_text(f'#include "{HERE_POLICIES / "opa_rt.h"}"\n' + extra_src.replace('#include "opa_rt.h"', ""))
        raw = Path(tmp) / "raw.wasm"
        cmd = [clang, "--target=wasm32", "-nostdlib", "-O2", "-fno-builtin", "-Wno-unused-function",
               "-Wl,--no-entry", "-Wl,--import-memory", "-Wl,--strip-all",
               *[f"-Wl,--export={e}" for e in exports], "-o", str(raw), *map(str, sources), str(gen)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return patch(raw.read_bytes(), major=1, minor=3, export_memory=True, start="opa_rt_init")


# ----------------------------------------------------------------------------------------- helpers

def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pct(values, 0.5), "p99": pct(values, 0.99), "max": max(values, default=0.0),
            "mean": statistics.fmean(values) if values else float("nan")}


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pki = TestPKI(tmp / "pki")
        port = free_port()
        self.broker = Broker(tmp / "mosquitto", port=port, extra_conf=fleet_broker_conf(port, self.pki)
                             + "max_connections -1\n")
        self.signer = Signer.create()
        self.url = f"mqtts://127.0.0.1:{port}"
        self.fw = FleetWorld(tmp, self.pki, self.broker, self.signer, self.url)


class Load:
    """Evaluations of the active policy on the event loop, back to back (yielding between them)."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.samples: list[tuple[float, float, int]] = []  # (start, latency_us, version)
        self.lags: list[tuple[float, float]] = []
        self.failed = 0
        self.running = True

    async def run(self) -> None:
        i = 0
        inp = {"k0": "abc", "k1": "temperature", "rule": "17"}
        while self.running:
            t_sched = time.perf_counter()
            await asyncio.sleep(0)
            t0 = time.perf_counter()
            self.lags.append((t0, (t0 - t_sched) * 1e6))
            policy = self.gw.policies.get(NAME)
            if policy is None:
                await asyncio.sleep(0.001)
                continue
            i += 1
            try:
                policy.evaluate(inp)
            except PolicyEvalError:
                self.failed += 1
            t1 = time.perf_counter()
            self.samples.append((t0, (t1 - t0) * 1e6, policy.version))
            if i % 4 == 0:
                await asyncio.sleep(0.0005)  # ~1–2k evaluations/s: continuous, leaves the loop room


# --------------------------------------------------------------------------- 1 + 2: one gateway

async def bench_swap(world: World, swaps: int) -> dict[str, Any]:
    wasm = big_policy()
    gw = world.fw.gateway("gw-bench", health_window_s=0.2, health_min_evals=50)
    # 200 recorded decisions of v1 (its real results): the shadow run of every later version replays them
    v1 = load_policy(wasm, name=NAME, version=1)
    inputs = [{"k0": f"v{i}", "k3": "x" * (i % 9), "rule": str(i * 7)} for i in range(200)]
    rows = [(inp, v1.evaluate(inp, "big/rule").raw, "big/rule") for inp in inputs]
    await gw.store.writer.run(decisions_job(NAME, 1, rows))
    releases = []
    for v in range(1, swaps + 2):
        art = custom_section(wasm, "rev", str(v).encode())  # distinct bytes: no cache can help
        releases.append((art, world.signer.sign(art, "policy", NAME, v, entrypoints=["big/rule"]), v))
    publish_to_active: list[float] = []
    gateway_ms: list[float] = []
    windows: list[tuple[float, float]] = []
    load = Load(gw)
    async with manager(world.fw) as mgr:
        task = asyncio.create_task(gw.agent.run())
        await asyncio.wait_for(gw.agent.link.connected.wait(), 15)
        art, bundle, v = releases[0]
        await mgr.push("all", art, bundle, "policy", NAME, v)
        await mgr.wait_state("gw-bench", v, "active", limit_s=60)
        load_task = asyncio.create_task(load.run())
        await asyncio.sleep(3.0)  # steady state
        steady_end = time.perf_counter()
        for art, bundle, v in releases[1:]:
            t0 = time.perf_counter()
            await mgr.push("all", art, bundle, "policy", NAME, v)
            await mgr.wait_state("gw-bench", v, "active", limit_s=60)
            t1 = time.perf_counter()
            publish_to_active.append((t1 - t0) * 1000)
            windows.append((t0, t1 + 0.05))
            await asyncio.sleep(0.35)  # let the health window pass (no coalescing between samples)
        load.running = False
        await load_task
        gateway_ms = list(gw.agent.swap.counters.swap_ms[1:])
        shadow = mgr.status("gw-bench") or {}
        steps = dict(gw.agent.swap.timings)
        await mgr.publish(TOPICS.release(Scope("all"), "policy", NAME), b"")  # clear: the sims must not get it
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    gw.store.close()

    def inside(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)
    steady = [lat for t, lat, _ in load.samples if t < steady_end]
    during = [lat for t, lat, _ in load.samples if inside(t)]
    lag_steady = [lag for t, lag in load.lags if t < steady_end]
    lag_during = [lag for t, lag in load.lags if inside(t)]
    s, d = summary(steady), summary(during)
    return {
        "policy_bytes": len(wasm),
        "publish_to_active_ms": summary(publish_to_active),
        "gateway_receive_to_active_ms": summary(gateway_ms),
        "shadow_last": shadow.get("shadow"), "last_swap_steps_ms": steps,
        "eval_steady_us": s, "eval_during_swap_us": d,
        "eval_p99_ratio": d["p99"] / s["p99"] if s["p99"] else None,
        "loop_lag_steady_us": summary(lag_steady), "loop_lag_during_swap_us": summary(lag_during),
        "evaluations": len(load.samples), "failed_evaluations": load.failed,
        "versions_seen": sorted({v for _, _, v in load.samples}),
    }


# ------------------------------------------------------------------------------- 3: convergence

class SimHandler:
    """A simulated gateway's installer: real verification, no compile, status straight to active."""

    def __init__(self, node: str, trust: TrustSet, reporter: StatusReporter) -> None:
        self.node = node
        self.trust = trust
        self.reporter = reporter
        self.floors: dict[tuple[str, str], int] = {}

    async def current_version(self, kind: str, name: str) -> int:
        return self.floors.get((kind, name), 0)

    async def running_version(self, kind: str, name: str) -> int | None:
        return self.floors.get((kind, name))

    async def handle(self, delivery: Delivery) -> str:
        env = delivery.envelope
        v = await run_blocking(verify_release, env.artifact, env.bundle_json, self.trust, dict(self.floors),
                               time.time(), check_content=False)
        self.floors[(v.kind, v.name)] = v.version
        await self.reporter.report(ReleaseStatus(node_id=self.node, kind=v.kind, name=v.name, version=v.version,
                                                 state="active", sha256=v.sha256, active_version=v.version))
        return "active"


async def bench_rollout(world: World, n: int, store: Store, artifact: bytes, version: int) -> dict[str, Any]:
    trust = TrustSet.of([world.signer.trusted(("policy",))])
    links: list[FleetLink] = []
    reporters: list[StatusReporter] = []
    tasks: list[asyncio.Task[None]] = []
    t_setup = time.perf_counter()
    for i in range(n):
        node = f"sim-{n}-{i:04d}"
        files = world.pki.client(node)
        cfg = LinkConfig(url=world.url, client_id=node, tls_ca=str(world.pki.ca), tls_cert=str(files.cert),
                         tls_key=str(files.key), reconnect_min_s=0.2, reconnect_max_s=2.0)
        reporter = StatusReporter(node, TOPICS, store.writer)
        receiver = ReleaseReceiver(node_id=node, site="", groups=(f"bench{n}",), topics=TOPICS,
                                   max_bytes=16 << 20, handler=SimHandler(node, trust, reporter), reporter=reporter)
        link = FleetLink(cfg, subscriptions=receiver.filters(), presence_topic=TOPICS.presence(node),
                         on_message=receiver.on_message)
        reporter.publish = link.publish
        links.append(link)
        reporters.append(reporter)
    for k in range(0, n, 50):  # connect in waves: TLS handshakes are the setup cost, not the rollout's
        for link in links[k:k + 50]:
            tasks.append(asyncio.create_task(link.run()))
        await asyncio.gather(*(asyncio.wait_for(lk.connected.wait(), 60) for lk in links[k:k + 50]))
    setup_s = time.perf_counter() - t_setup
    rollout = Rollout("policy", f"conv{n}", version, TOPICS)
    bundle = world.signer.sign(artifact, "policy", f"conv{n}", version)
    payload = encode("policy", f"conv{n}", version, artifact, bundle)
    mgr_cfg = world.fw.link_for("fleet-manager", client_id=f"mgr-{n}", clean=True)
    async with aiomqtt.Client(**client_kwargs(mgr_cfg)) as mgr:
        await mgr.subscribe(TOPICS.status_filter("policy", f"conv{n}"), qos=1)
        t0 = time.perf_counter()
        await mgr.publish(TOPICS.release(Scope("group", f"bench{n}"), "policy", f"conv{n}"), payload, qos=1,
                          retain=True)
        first: float | None = None
        async with asyncio.timeout(120):
            async for msg in mgr.messages:
                body = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
                rollout.feed(str(msg.topic), body)
                if first is None:
                    first = time.perf_counter() - t0
                if rollout.counts(n)["active"] >= n:
                    break
        converge_s = time.perf_counter() - t0
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for r in reporters:
        await r.close()
    return {"gateways": n, "converge_s": converge_s, "first_active_s": first, "setup_s": setup_s,
            "per_gateway_ms": converge_s * 1000 / n, "payload_bytes": len(payload)}


# -------------------------------------------------------------------------------------------- main

async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    world = World(tmp)
    world.broker.start()
    try:
        swap = await bench_swap(world, args.swaps)
        store = Store.open(tmp / "sim-state")
        try:
            conv = []
            artifact = custom_section(big_policy(), "conv", b"1")
            for n in args.sizes:
                conv.append(await bench_rollout(world, n, store, artifact, 1))
                print(f"  rollout {n:>4} gateways: {conv[-1]['converge_s']:.2f} s", flush=True)
        finally:
            store.close()
    finally:
        world.broker.kill()
    return {"swap": swap, "convergence": conv}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,500")
    parser.add_argument("--swaps", type=int, default=10)
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    logs.configure(os.environ.get("BENCH_LOGS", "warning"), "console",
                   stream=sys.stderr if os.environ.get("BENCH_LOGS") else open(os.devnull, "w"))  # noqa: SIM115
    print("building the 140 kB policy …", flush=True)
    big_policy()
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    swap, conv = result["swap"], result["convergence"]
    p2a, ev_s, ev_d = swap["publish_to_active_ms"], swap["eval_steady_us"], swap["eval_during_swap_us"]
    print()
    print(f"{'metric':<52} {'value':>14}  target")
    print(f"{'policy size (bytes)':<52} {swap['policy_bytes']:>14}")
    print(f"{'publish → active p50 / max (ms)':<52} {p2a['p50']:>7.0f} /{p2a['max']:>5.0f}  ≤ 300 ms")
    g = swap["gateway_receive_to_active_ms"]
    print(f"{'  of which on the gateway p50 (ms)':<52} {g['p50']:>14.0f}")
    print(f"{'eval p50 / p99 steady (µs)':<52} {ev_s['p50']:>7.0f} /{ev_s['p99']:>5.0f}")
    print(f"{'eval p50 / p99 during swaps (µs)':<52} {ev_d['p50']:>7.0f} /{ev_d['p99']:>5.0f}")
    ratio = swap["eval_p99_ratio"]
    print(f"{'eval p99 during / steady':<52} {ratio:>14.2f}  ≤ 2×")
    ls, ld = swap["loop_lag_steady_us"], swap["loop_lag_during_swap_us"]
    print(f"{'loop lag p99 steady / during swaps (µs)':<52} {ls['p99']:>7.0f} /{ld['p99']:>5.0f}")
    print(f"{'evaluations / failed':<52} {swap['evaluations']:>7} /{swap['failed_evaluations']:>5}  0 failed")
    print(f"{'shadow diff of the last swap':<52} {json.dumps(swap['shadow_last']):>14}")
    steps = ", ".join(f"{k} {v:.0f}" for k, v in swap["last_swap_steps_ms"].items())
    print(f"{'last swap on the gateway (ms)':<52} {steps}")
    for c in conv:
        print(f"{'rollout converge, ' + str(c['gateways']) + ' gateways (s)':<52} {c['converge_s']:>14.2f}"
              f"  ({c['per_gateway_ms']:.1f} ms/gateway){'  ≤ 10 s' if c['gateways'] == 500 else ''}")
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (OUT / "fleet.json").write_text(json.dumps({**meta, **result}, indent=2) + "\n")
    print(f"\nwrote {OUT / 'fleet.json'} (1-min load average at the end: {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} CPUs: the box is shared, latencies grow with its load)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
