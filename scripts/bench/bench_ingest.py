"""Local control loop benchmark: durable ingest rate, and reading → actuation latency.

1. ``store``: the agent's ingest path without a network — parse + group-committed SQLite writes
   (synchronous=FULL) + the ack hand-off, the whole process pinned to ONE core.
2. ``broker``: the same through a real Mosquitto: a publisher process (other core) sends QoS 1
   messages as fast as the broker PUBACKs them; the agent process (bus with manual ack after commit
   + ingest, pinned to one core) stores them. Messages carry 1 reading, or a JSON array of 10.
3. ``latency``: the full loop — reading published → stored → thermostat module (C → Wasm) → gate
   policy (OPA-Wasm) → decision logged → actuation published — at a steady 1k readings/s. A separate
   process publishes the readings and listens for the actuations; every reading flips its device's
   fan, so each one must produce exactly one actuation; latency = actuation received − reading sent.

Usage: .venv/bin/python scripts/bench/bench_ingest.py [--readings 200000] [--broker-msgs 40000]
       [--rate 1000] [--seconds 10] [--repeat 3]
Writes var/bench/ingest.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
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

from agent.config.model import LocalBrokerSettings
from agent.config.modules import ModuleSettings
from agent.config.pipeline import PipelineSettings
from agent.control.pipeline import Pipeline
from agent.logs import configure
from agent.messaging.bus import BusMessage, LocalBus
from agent.messaging.ingest import Ingest
from agent.policy.engine import load_policy
from agent.policy.registry import PolicyRegistry
from agent.runtime.modules import ModuleRuntime
from agent.storage import Store
from agent_devkit.broker import Broker
from agent_devkit.examples import example
from agent_devkit.localbus import persistence_conf
from agent_devkit.opa.gate import build_gate

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "var" / "bench"
DEVICES = 50
BATCH_WINDOW_MS = int(os.environ.get("BENCH_BATCH_WINDOW_MS", "0"))
# the gate as in the demo, but nothing locked out and nothing masked (the value identifies the reading)
BENCH_GATE_DATA: dict[str, Any] = {"edge": {"lockout": [], "mask": [], "limits": {}}}


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > core:
        os.sched_setaffinity(0, {core})


def thermostat() -> bytes:
    return example("thermostat")


# ---- 1. store path ---------------------------------------------------------------------------------

async def bench_store(n: int, work: Path) -> dict[str, Any]:
    store = Store.open(work / "store", synchronous="FULL")
    ingest = Ingest(store)
    done = asyncio.Event()
    ingest.add_listener(lambda _r: done.set() if ingest.stored >= n else None)
    task = asyncio.create_task(ingest.run())
    msgs = [BusMessage(f"factory/line{i % 4}/press{i % 16}/temp", str(20 + (i % 100) / 10).encode(), 1, False,
                       i % 65535 + 1, 0.0) for i in range(n)]
    commits0 = store.writer.commits
    t0 = time.perf_counter()
    for i, m in enumerate(msgs):
        ingest.handle(m)
        if i % 256 == 255:
            await asyncio.sleep(0)  # let the flusher run, as the bus reader would
    await done.wait()
    dt = time.perf_counter() - t0
    commits = store.writer.commits - commits0
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    store.close()
    return {"readings": n, "seconds": round(dt, 3), "readings_per_s": round(n / dt), "commits": commits,
            "readings_per_commit": round(n / max(1, commits), 1), "synchronous": "FULL", "cores": 1}


# ---- 2. through the broker ----------------------------------------------------------------------------

PUBLISHER = r"""
import asyncio, json, sys, time, os
import aiomqtt

os.sched_setaffinity(0, {int(sys.argv[4])}) if hasattr(os, "sched_setaffinity") else None
port, n, per = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
async def main():
    sem = asyncio.Semaphore(200)
    done = 0
    async def one(c, i):
        nonlocal done
        try:
            if per == 1:
                payload = str(20 + (i % 100) / 10)
            else:
                payload = json.dumps([20 + ((i * per + k) % 100) / 10 for k in range(per)])
            await c.publish(f"factory/line{i % 4}/press{i % 16}/temp", payload, qos=1, timeout=30)
            done += 1
        finally:
            sem.release()
    async with aiomqtt.Client("127.0.0.1", port, identifier="bench-pub", max_inflight_messages=200) as c:
        c.pending_calls_threshold = 10_000
        t0 = time.perf_counter()
        tasks = []
        for i in range(n):
            await sem.acquire()
            tasks.append(asyncio.create_task(one(c, i)))
        await asyncio.gather(*tasks)
        print(json.dumps({"acked": done, "seconds": time.perf_counter() - t0}))
asyncio.run(main())
"""


async def bench_broker(n_msgs: int, per: int, work: Path, tag: str) -> dict[str, Any]:
    broker = Broker(work / f"mq-{tag}", extra_conf=persistence_conf("max_inflight_messages 1000\n"))
    broker.start()
    store = Store.open(work / f"broker-{tag}", synchronous="FULL")
    try:
        bus = LocalBus(LocalBrokerSettings(host=broker.host, port=broker.port, client_id=f"bench-{tag}"), "bench")
        ingest = Ingest(store, on_store_failure=bus.request_reconnect)
        bus.subscribe("factory/#", ingest.handle, manual_ack=True)
        tasks = [asyncio.create_task(bus.run()), asyncio.create_task(ingest.run())]
        await bus.wait_connected(10)
        other = 1 if (os.cpu_count() or 1) > 1 else 0
        pub = await asyncio.create_subprocess_exec(sys.executable, "-c", PUBLISHER, str(broker.port), str(n_msgs),
                                                   str(per), str(other), stdout=subprocess.PIPE)
        first: float | None = None
        deadline = time.monotonic() + 300
        while ingest.stored < n_msgs * per and time.monotonic() < deadline:
            if first is None and bus.received:
                first = time.perf_counter()
            await asyncio.sleep(0.002)
        end = time.perf_counter()
        out, _ = await pub.communicate()
        pub_res = json.loads(out.decode().strip().splitlines()[-1])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dt = end - (first or end)
        stored = ingest.stored
        return {"messages": n_msgs, "readings_per_message": per, "readings": stored, "seconds": round(dt, 3),
                "messages_per_s": round(n_msgs / dt) if dt else None,
                "readings_per_s": round(stored / dt) if dt else None,
                "publisher_acked": pub_res["acked"], "acked_to_broker": bus.acked,
                "broker_max_inflight": 1000}
    finally:
        store.close()
        broker.stop()


# ---- 3. latency reading → actuation ---------------------------------------------------------------

# the line and the actuators: two small paho processes (network thread each), so the measuring side
# is cheap and never the bottleneck. Reading k goes to device k % DEVICES with value 35 + k/1e4 or
# 20 + k/1e4 (each visit flips the device's fan); the bench gate does not mask the value, so the
# actuation carries it back and names the exact reading it answers.
SENSORS = r"""
import json, os, sys, time
import paho.mqtt.client as mqtt
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(sys.argv[5])})
port, rate, seconds, devices = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-line")
c.max_inflight_messages_set(1000)
c.connect("127.0.0.1", port)
c.loop_start()
time.sleep(0.5)
n = int(rate * seconds)
sent = []
t0 = time.monotonic()
for k in range(n):
    due = t0 + k / rate
    d = due - time.monotonic()
    if d > 0:
        time.sleep(d)
    visit = k // devices
    value = (35.0 if visit % 2 == 0 else 20.0) + (k % 10000) / 10000
    sent.append(time.monotonic())
    c.publish(f"factory/bench/d{k % devices}/temp", repr(value), qos=1)
time.sleep(1.0)
c.loop_stop()
print(json.dumps({"sent": sent, "send_seconds": time.monotonic() - t0 - 1.0}))
"""

ACTUATORS = r"""
import json, os, sys, time
import paho.mqtt.client as mqtt
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(sys.argv[3])})
port, seconds = int(sys.argv[1]), float(sys.argv[2])
got = []
def on_message(_c, _u, m):
    got.append((time.monotonic(), json.loads(m.payload)["value"]))
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-actuators")
c.on_message = on_message
c.connect("127.0.0.1", port)
c.subscribe("actuators/#", qos=1)
c.loop_start()
print("ready", flush=True)
time.sleep(seconds)
c.loop_stop()
print(json.dumps(got))
"""


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


async def bench_latency(rate: float, seconds: float, work: Path, synchronous: str = "FULL") -> dict[str, Any]:
    broker = Broker(work / f"mq-lat-{synchronous}", extra_conf=persistence_conf("set_tcp_nodelay true\n"))
    broker.start()
    store = Store.open(work / f"latency-{synchronous}", synchronous=synchronous)
    try:
        bus = LocalBus(LocalBrokerSettings(host=broker.host, port=broker.port, client_id="bench-agent"), "bench")
        ingest = Ingest(store, on_store_failure=bus.request_reconnect)
        bus.subscribe("factory/#", ingest.handle, manual_ack=True)
        runtime = ModuleRuntime(store, ModuleSettings(), state_dir=work / f"latency-{synchronous}")
        registry = PolicyRegistry()
        registry.swap("gate", load_policy(build_gate(), name="gate", version=1, data=BENCH_GATE_DATA))
        pipeline = Pipeline(store, PipelineSettings(), "bench", publisher=bus, policies=registry)
        ingest.add_listener(runtime.offer)
        runtime.set_sink(pipeline.sink)
        wasm = thermostat()
        await runtime.load_release("thermostat", 1, hashlib.sha256(wasm).hexdigest(), wasm, {
            "trigger": {"type": "topic", "topics": ["factory/+/+/temp"], "batch_window_ms": BATCH_WINDOW_MS},
            "config": {"metric": "temp", "high": 30.0, "low": 27.0, "actuator_prefix": "actuators"}})
        tasks = [asyncio.create_task(bus.run()), asyncio.create_task(ingest.run()),
                 asyncio.create_task(pipeline.run())]
        await bus.wait_connected(10)
        other = 1 if (os.cpu_count() or 1) > 1 else 0
        act = await asyncio.create_subprocess_exec(sys.executable, "-c", ACTUATORS, str(broker.port),
                                                   str(seconds + 6), str(other), stdout=subprocess.PIPE)
        assert act.stdout is not None
        await act.stdout.readline()  # "ready": subscribed
        cpu0 = time.process_time()
        line = await asyncio.create_subprocess_exec(sys.executable, "-c", SENSORS, str(broker.port), str(rate),
                                                    str(seconds), str(DEVICES), str(other), stdout=subprocess.PIPE)
        line_out, _ = await line.communicate()
        act_out, _ = await act.communicate()
        await pipeline.idle()
        cpu_s = time.process_time() - cpu0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runtime.close()
        sent = json.loads(line_out.decode().strip().splitlines()[-1])
        got = json.loads(act_out.decode().strip().splitlines()[-1])
        send_times = sent["sent"]
        lat_ms = []
        for t_recv, value in got:
            k = round((float(value) % 1) * 10000)
            candidates = [j for j in (k, k + 10000, k + 20000) if j < len(send_times)]
            if candidates:
                j = max((j for j in candidates if send_times[j] <= t_recv), default=None)
                if j is not None:
                    lat_ms.append((t_recv - send_times[j]) * 1000)
        res = {"sent": len(send_times), "send_seconds": sent["send_seconds"], "missing": len(send_times) - len(got),
               "extra": len(got) - len(lat_ms)}
        warm = lat_ms[int(len(lat_ms) * 0.1):]  # drop the first 10 % (compilation, cache warm-up)
        return {"rate_per_s": rate, "synchronous": synchronous, "commits": store.writer.commits,
                "readings_sent": res["sent"], "send_seconds": round(res["send_seconds"], 2),
                "actuations_matched": len(lat_ms), "readings_without_actuation": res["missing"],
                "unexpected_actuations": res["extra"], "module_runs": runtime.runs,
                "agent_cpu_ms_per_reading": round(cpu_s * 1000 / max(1, res["sent"]), 3),
                "decisions": dict(pipeline.counts),
                "p50_ms": round(statistics.median(warm), 2), "p90_ms": round(pct(warm, 90), 2),
                "p99_ms": round(pct(warm, 99), 2), "max_ms": round(max(warm), 2)}
    finally:
        store.close()
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--broker-msgs", type=int, default=40_000)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--low-rate", type=float, default=200.0, help="a second, unsaturated rate for comparison")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of the FULL latency measurement at --rate (p99 is noisy: the worst counts)")
    args = ap.parse_args()
    configure("warning", "console")
    pin(0)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None  # the box is shared: report both
    try:
        store_res = asyncio.run(bench_store(args.readings, work))
        broker1 = asyncio.run(bench_broker(args.broker_msgs, 1, work, "single"))
        broker10 = asyncio.run(bench_broker(args.broker_msgs // 5, 10, work, "batch10"))
        # latency: the agent as deployed (not pinned): loop, writer, module thread share both cores
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        runs = [asyncio.run(bench_latency(args.rate, args.seconds, work / f"run{i}", "FULL"))
                for i in range(max(1, args.repeat))]
        latency = max(runs, key=lambda r: float(r["p99_ms"]))  # judge the target on the worst run
        latency_normal = asyncio.run(bench_latency(args.rate, args.seconds, work, "NORMAL"))
        latency_low = asyncio.run(bench_latency(args.low_rate, args.seconds, work, "FULL"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "store": store_res, "broker_single": broker1, "broker_batch10": broker10, "latency": latency,
              "latency_runs": runs,
              "latency_normal": latency_normal, "latency_low_rate": latency_low,
              "load_average_start": load_start,
              "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("durable ingest, no network (1 core, FULL)", f"{store_res['readings_per_s']:,} readings/s",
         f"{store_res['readings_per_commit']} readings/commit", "target >= 10,000/s"),
        ("via Mosquitto, 1 reading/msg (QoS 1, ack after commit)", f"{broker1['readings_per_s']:,} readings/s",
         f"{broker1['messages_per_s']:,} msg/s", ""),
        ("via Mosquitto, 10 readings/msg", f"{broker10['readings_per_s']:,} readings/s",
         f"{broker10['messages_per_s']:,} msg/s", "target >= 10,000/s"),
        (f"reading -> actuation at {args.rate:g}/s (FULL), worst of {len(runs)}", f"p50 {latency['p50_ms']} ms",
         f"p99 {latency['p99_ms']} ms (max {latency['max_ms']})", "target p99 <= 20 ms"),
        (f"  p99 of each of the {len(runs)} runs", "", " / ".join(f"{r['p99_ms']} ms" for r in runs), ""),
        (f"reading -> actuation at {args.rate:g}/s (NORMAL)", f"p50 {latency_normal['p50_ms']} ms",
         f"p99 {latency_normal['p99_ms']} ms (max {latency_normal['max_ms']})", "target p99 <= 20 ms"),
        (f"reading -> actuation at {args.low_rate:g}/s (FULL)", f"p50 {latency_low['p50_ms']} ms",
         f"p99 {latency_low['p99_ms']} ms (max {latency_low['max_ms']})", ""),
    ]
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))
    for lat in (latency, latency_normal, latency_low):
        print(f"latency ({lat['rate_per_s']:g}/s, {lat['synchronous']}): {lat['actuations_matched']} actuations "
              f"for {lat['readings_sent']} readings ({lat['readings_without_actuation']} merged into a later run, "
              f"{lat['unexpected_actuations']} unmatched), {lat['module_runs']} module runs, {lat['commits']} commits, "
              f"agent CPU {lat['agent_cpu_ms_per_reading']} ms/reading")
    print(f"load average at start: {load_start}, at the end: {result['load_average']}")
    print(f"wrote {OUT / 'ingest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
