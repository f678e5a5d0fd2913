"""Fleet distribution at scale: registry + MQTT doorbell vs retained MQTT releases, side by side.

N simulated gateways in a few worker processes. Each is a lightweight puller built from the real
gateway code: the RegistryClient (async HTTP, digest-verified resumable downloads), the
RegistryPuller (desired state: verify_desired against the trust set, sequence, scope), the
ReleaseReceiver, and verify_release (signature, key scope, digest, floor) — with an in-memory
ledger instead of one SQLite file each and without compiling the Wasm (work that runs in parallel
on real devices). Each gateway has its own MQTT connection to one Mosquitto (the doorbell, or the
retained release topic for the comparison) and its own HTTP connection to one docker-registry.

Per N and path, for a new 150 kB policy and then a new 5 MB module:
- time to converge: from the publish until the last gateway has verified and activated it;
- bytes served by the registry (response bodies counted by the clients) and by the broker
  (``$SYS/broker/bytes/sent``), both per gateway;
- registry requests per gateway; peak broker memory (VmHWM of the mosquitto process);
- gateways left on the old version (must be 0);
- offline gateways (1 %): disconnected during the rollout, they reconnect afterwards and must
  converge within one poll period (``--poll``).

Usage: .venv/bin/python scripts/bench/bench_registry.py [--sizes 100,1000,5000] [--workers 4]
       [--mqtt-module-max 1000] [--poll 30] [--kinds policy,module] [--paths registry,mqtt] [--out NAME]
Writes var/bench/registry.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from agent import logs
from agent.fleet.envelope import encode
from agent.fleet.receiver import Delivery, ReleaseReceiver
from agent.fleet.registry import (
    MemoryLedger,
    PullSettings,
    RegistryPuller,
    parse_doorbell,
)
from agent.fleet.topics import Scope, Topics, gateway_scopes
from agent.oci.client import RegistryClient, RegistryConfig
from agent.offload import run_blocking
from agent.trust.keys import load_private_pem, load_public_pem
from agent.trust.truststore import TrustedKey, TrustSet
from agent.trust.verify import verify_release

ROOT = Path(__file__).resolve().parents[2]

OUT = ROOT / "var" / "bench"
SCRIPT = Path(__file__).resolve()
TOPICS = Topics()
SITES = 10
KINDS = (("policy", "gate"), ("module", "thermostat"))


# =============================================================================== worker (a few processes)

def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class _Writer:
    async def run(self, job: Any) -> None:
        return None


class SimReporter:
    """The receiver reports malformed and superseded releases; a simulated gateway only counts them."""

    writer = _Writer()

    async def report(self, status: Any) -> None:
        emit({"event": "report", "state": status.state, "code": status.code})


class SimHandler:
    """What installs a release on a simulated gateway: the real verify_release (signature, key scope,
    digest, floor); the activation is a floor in memory (no SQLite, no Wasm compile)."""

    def __init__(self, gw: SimGateway) -> None:
        self.gw = gw

    async def current_version(self, kind: str, name: str) -> int:
        return self.gw.ledger.floors.get((kind, name), 0)

    async def running_version(self, kind: str, name: str) -> int | None:
        return self.gw.ledger.floors.get((kind, name))

    async def handle(self, delivery: Delivery) -> str:
        env = delivery.envelope
        floor = self.gw.ledger.floors.get((env.kind, env.name))
        try:
            v = await run_blocking(verify_release, env.artifact, env.bundle_json, self.gw.trust, floor, time.time(),
                                   check_content=False)
        except Exception as exc:
            emit({"event": "rejected", "gw": self.gw.index, "error": str(exc)[:200]})
            return "rejected"
        self.gw.ledger.floors[(v.kind, v.name)] = v.version
        emit({"event": "active", "gw": self.gw.index, "kind": v.kind, "version": v.version, "t": time.time()})
        return "active"


@dataclass
class SimGateway:
    index: int
    node_id: str
    site: str
    trust: TrustSet
    ledger: MemoryLedger
    receiver: ReleaseReceiver
    puller: RegistryPuller | None
    client: RegistryClient | None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


async def worker(opts: dict[str, Any]) -> None:
    logs.configure(level="error")
    trust = TrustSet((TrustedKey(public=load_public_pem(opts["trust_pem"])),))
    mode, broker_port = opts["mode"], opts["broker_port"]
    offline = set(opts["offline"])
    gateways: list[SimGateway] = []
    work = Path(opts["work"])
    for i in opts["ids"]:
        node, site = f"gw-{i:05d}", f"site-{i % SITES}"
        ledger = MemoryLedger(trust, floors={(k, n): 1 for k, n in KINDS})
        gw = SimGateway(i, node, site, trust, ledger, None, None, None)  # type: ignore[arg-type]
        gw.receiver = ReleaseReceiver(node_id=node, site=site, groups=(), topics=TOPICS, max_bytes=16 << 20,
                                      handler=SimHandler(gw), reporter=SimReporter())  # type: ignore[arg-type]
        if mode == "registry":
            gw.client = RegistryClient(RegistryConfig(opts["registry"]), downloads=asyncio.Semaphore(2))
            gw.puller = RegistryPuller(node_id=node, scopes=gateway_scopes(node, site, ()), client=gw.client,
                                       ledger=ledger, receiver=gw.receiver, work_dir=work / node,
                                       settings=PullSettings(poll_s=opts["poll"], doorbell_jitter_s=opts["jitter"],
                                                             connect_jitter_s=opts["connect_jitter"]))
        gateways.append(gw)

    connected = asyncio.Event()
    pending = {gw.index for gw in gateways if gw.index not in offline}

    async def run_gateway(gw: SimGateway) -> None:
        filters = (TOPICS.doorbell_filters(gw.node_id, gw.site, ()) if mode == "registry"
                   else TOPICS.release_filters(gw.node_id, gw.site, ()))
        while True:
            try:
                async with aiomqtt.Client("127.0.0.1", broker_port, identifier=gw.node_id, clean_session=True,
                                          keepalive=120, timeout=60) as client:
                    for f in filters:
                        await client.subscribe(f, qos=1)
                    if gw.puller is not None:
                        gw.puller.on_connect()
                    pending.discard(gw.index)
                    if not pending:
                        connected.set()
                    async for msg in client.messages:
                        payload = bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
                        topic = str(msg.topic)
                        if gw.puller is not None:
                            bell = parse_doorbell(TOPICS.prefix, topic, payload)
                            if bell is not None:
                                gw.puller.on_doorbell(bell)
                        else:
                            await gw.receiver.on_message(topic, payload, bool(msg.retain))
            except aiomqtt.MqttError as exc:
                emit({"event": "mqtt_error", "gw": gw.index, "error": str(exc)[:200]})
                await asyncio.sleep(random.uniform(0.5, 2.0))

    def start(gw: SimGateway) -> None:
        gw.tasks.append(asyncio.create_task(run_gateway(gw)))
        if gw.puller is not None:
            gw.tasks.append(asyncio.create_task(gw.puller.run()))

    # connect in small bursts: a real fleet does not open thousands of sessions in one millisecond
    for n, gw in enumerate(gw for gw in gateways if gw.index not in offline):
        start(gw)
        if n % 50 == 49:
            await asyncio.sleep(0.05)
    if pending:
        await connected.wait()
    for gw in gateways:  # the initial pulls (desired state v1: nothing to download) settle first
        if gw.puller is not None and gw.index not in offline:
            await gw.puller.synced.wait()
    emit({"event": "ready", "n": len(gateways)})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        if not line:
            break
        cmd = json.loads(line)
        if cmd["cmd"] == "stats":
            stats = [gw.client.stats for gw in gateways if gw.client is not None]
            emit({"event": "stats", "requests": sum(s.requests for s in stats),
                  "bytes": sum(s.bytes_in for s in stats), "resumed": sum(s.resumed for s in stats)})
        elif cmd["cmd"] == "reconnect":
            for gw in gateways:
                if gw.index in offline:
                    start(gw)
        elif cmd["cmd"] == "stop":
            break
    for gw in gateways:
        for t in gw.tasks:
            t.cancel()
    await asyncio.gather(*(t for gw in gateways for t in gw.tasks), return_exceptions=True)
    for gw in gateways:
        if gw.client is not None:
            await gw.client.aclose()
    emit({"event": "stopped"})


# =============================================================================== parent

@dataclass
class Run:
    n: int
    path: str
    workers: list[asyncio.subprocess.Process] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    active: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)
    ready: int = 0
    stats: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


async def _read_events(run: Run, proc: asyncio.subprocess.Process) -> None:
    assert proc.stdout is not None
    while True:
        line = await proc.stdout.readline()
        if not line:
            return
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = ev.get("event")
        if kind == "active":
            run.active.setdefault((ev["kind"], ev["version"]), {})[ev["gw"]] = ev["t"]
        elif kind == "ready":
            run.ready += 1
        elif kind == "stats":
            run.stats.append(ev)
        elif kind in ("rejected", "mqtt_error", "report"):
            run.errors.append(json.dumps(ev))
        run.changed.set()


async def _until(run: Run, pred: Any, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            return False
        run.changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.changed.wait(), 0.5)
    return True


async def _command(run: Run, cmd: dict[str, Any]) -> None:
    for proc in run.workers:
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await proc.stdin.drain()


async def _stats(run: Run) -> dict[str, int]:
    run.stats.clear()
    await _command(run, {"cmd": "stats"})
    await _until(run, lambda: len(run.stats) == len(run.workers), 60)
    return {k: sum(int(s[k]) for s in run.stats) for k in ("requests", "bytes")}


class BrokerMeter:
    """``$SYS/broker/bytes/sent`` (sys_interval 1) and the broker's peak RSS."""

    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid = port, pid
        self.sent = 0
        self._task: asyncio.Task[None] | None = None
        self._seen = asyncio.Event()

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-meter") as client:
            await client.subscribe("$SYS/broker/bytes/sent")
            async for msg in client.messages:
                with contextlib.suppress(ValueError):
                    self.sent = int(bytes(msg.payload).decode())
                    self._seen.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._seen.wait(), 10)

    async def settled(self) -> int:
        await asyncio.sleep(2.2)  # two $SYS periods
        return self.sent

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task


@dataclass
class Releases:
    key_pem: Path
    pub_pem: Path
    pub_text: str
    arts: dict[tuple[str, int], tuple[bytes, bytes]]


def make_releases(tmp: Path, policy_bytes: int, module_bytes: int) -> Releases:
    from agent.trust.keys import generate
    from agent.trust.signer import sign_release
    from agent_devkit.fleet import custom_section
    from agent_devkit.releases import padded_wasm

    key = generate()
    key_pem, pub_pem = tmp / "fleet.key", tmp / "fleet.pub"
    key_pem.write_bytes(key.to_pem())
    pub_pem.write_text(key.public.pem)
    arts: dict[tuple[str, int], tuple[bytes, bytes]] = {}
    for kind, name in KINDS:
        size = policy_bytes if kind == "policy" else module_bytes
        base = padded_wasm(size - 64)
        for version in (1, 2):
            data = custom_section(base, "version", str(version).encode())
            arts[(kind, version)] = (data, sign_release(key, data, kind, name, version))
    return Releases(key_pem, pub_pem, key.public.pem, arts)


def _publish(registry_url: str, rel: Releases, kind: str, version: int) -> list[Any]:
    from agent.fleet.publishing import publish
    from agent.oci.publish import Publisher, RegistryTarget

    artifact, bundle = rel.arts[(kind, version)]
    trust = TrustSet((TrustedKey(public=load_public_pem(rel.pub_pem.read_bytes())),))
    report = publish(Publisher(RegistryTarget(registry_url)), artifact=artifact, bundle=bundle,
                     targets=[Scope("all")], repo_prefix="edge", trust=trust,
                     signing_key=load_private_pem(rel.key_pem.read_bytes()))
    return report.scopes


async def _phase(run: Run, meter: BrokerMeter, rel: Releases, kind: str, path: str, registry: Any, port: int,
                 bell: Any, online: list[int], n: int, opts: argparse.Namespace, out: dict[str, Any]) -> None:
    """One release (kind) to every online gateway of one path; fills ``out["phases"][kind]``."""
    from agent.fleet.publishing import ring

    artifact, bundle = rel.arts[(kind, 2)]
    b0, s0 = await meter.settled(), await _stats(run)
    t0 = time.time()
    if path == "registry":
        scopes = await asyncio.to_thread(_publish, registry.url, rel, kind, 2)
        await ring(bell, TOPICS.prefix, scopes)
    else:
        name = dict(KINDS)[kind]
        # the broker acknowledges a retained release only once it has queued it for everybody: at
        # N x 6.7 MB that can take minutes (a 10 s timeout failed at N = 1,000)
        async with aiomqtt.Client("127.0.0.1", port, identifier="bench-pub", timeout=900) as pub:
            await pub.publish(TOPICS.release(Scope("all"), kind, name), encode(kind, name, 2, artifact, bundle),
                              qos=1, retain=True, timeout=900)
    got = run.active.setdefault((kind, 2), {})
    done = await _until(run, lambda: all(i in got for i in online), opts.limit)
    t_last = max((got[i] for i in online if i in got), default=t0)
    b1, s1 = await meter.settled(), await _stats(run)
    out["phases"][kind] = {
        "bytes": len(artifact), "converge_s": round(t_last - t0, 2), "all_converged": done,
        "left_behind": sum(1 for i in online if i not in got),
        "broker_bytes_per_gw": round((b1 - b0) / len(online)),
        "registry_bytes_per_gw": round((s1["bytes"] - s0["bytes"]) / len(online)),
        "registry_requests_per_gw": round((s1["requests"] - s0["requests"]) / len(online), 2),
        "p50_s": round(sorted(got[i] - t0 for i in online if i in got)[len(got) // 2], 2) if got else None,
    }
    print(f"  N={n} {path:<8} {kind:<6} converged in {t_last - t0:6.2f} s "
          f"(left behind {out['phases'][kind]['left_behind']})", flush=True)


async def run_path(n: int, path: str, rel: Releases, opts: argparse.Namespace, tmp: Path,
                   kinds: list[str]) -> dict[str, Any]:
    from agent.fleet.link import LinkConfig
    from agent_devkit.broker import Broker, free_port
    from agent_devkit.registry import Registry

    work = tmp / f"{path}-{n}"
    port = free_port()
    broker = Broker(work / "mosquitto", port=port, extra_conf="sys_interval 1\nmax_connections -1\n")
    broker.start()
    registry = Registry(work / "registry").start() if path == "registry" else None
    run = Run(n, path)
    out: dict[str, Any] = {"n": n, "path": path, "phases": {}}
    try:
        if registry is not None:
            for kind in ("policy", "module"):
                await asyncio.to_thread(_publish, registry.url, rel, kind, 1)
        meter = BrokerMeter(port, broker.pid or 0)
        await meter.start()
        ids = list(range(n))
        offline = sorted(random.Random(n).sample(ids, max(1, n // 100)))
        per = (n + opts.workers - 1) // opts.workers
        for w in range(opts.workers):
            chunk = ids[w * per:(w + 1) * per]
            if not chunk:
                continue
            wopts = {"mode": path, "ids": chunk, "offline": [i for i in offline if i in chunk],
                     "broker_port": port, "registry": registry.url if registry else "", "trust_pem": rel.pub_text,
                     "poll": opts.poll, "jitter": opts.jitter, "connect_jitter": 2.0, "work": str(work / "gw")}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SCRIPT), "--worker", json.dumps(wopts),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 20)
            run.workers.append(proc)
            run.readers.append(asyncio.create_task(_read_events(run, proc)))
        started = time.perf_counter()
        if not await _until(run, lambda: run.ready == len(run.workers), 600):
            raise RuntimeError(f"workers not ready: {run.ready}/{len(run.workers)}; {run.errors[:3]}")
        out["setup_s"] = round(time.perf_counter() - started, 1)
        online = [i for i in ids if i not in offline]
        bell = LinkConfig(url=f"mqtt://127.0.0.1:{port}", client_id="bench-bell", clean_session=True)
        for kind in kinds:
            if path == "mqtt" and kind == "module" and n > opts.mqtt_module_max:
                out["phases"][kind] = {"skipped": f"N > --mqtt-module-max {opts.mqtt_module_max}"}
                continue
            try:
                await _phase(run, meter, rel, kind, path, registry, port, bell, online, n, opts, out)
            except Exception as exc:  # e.g. the broker cannot even acknowledge the publish
                out["phases"][kind] = {"failed": repr(exc)}
                print(f"  N={n} {path:<8} {kind:<6} failed: {exc!r}", flush=True)
        # the offline 1 %: they reconnect now and must converge within one poll period
        t_r = time.time()
        await _command(run, {"cmd": "reconnect"})
        measured = [k for k in kinds if "converge_s" in out["phases"].get(k, {})]
        ok = await _until(run, lambda: all(i in run.active.get((k, 2), {}) for k in measured for i in offline),
                          max(opts.poll * 2, 60))
        worst = max((run.active.get((k, 2), {}).get(i, float("inf")) - t_r for k in measured for i in offline),
                    default=0.0)
        out["offline"] = {"gateways": len(offline), "converge_after_reconnect_s": round(worst, 2),
                          "within_poll_period": ok and worst <= opts.poll, "poll_s": opts.poll}
        out["peak_broker_rss_mb"] = round(meter.peak_rss_mb(), 1)
        out["errors"] = run.errors[:5]
        out["error_count"] = len(run.errors)
        await meter.stop()
        await _command(run, {"cmd": "stop"})
    finally:
        for proc in run.workers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        broker.kill()
        if registry is not None:
            registry.stop(signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    return out


def table(results: list[dict[str, Any]]) -> str:
    head = ("| N | path | release | converge s | left behind | broker B/gw | registry B/gw | registry req/gw "
            "| peak broker MB | offline: converge after reconnect s |")
    rows = [head, "|" + "---|" * 10]
    for r in results:
        for kind, ph in r["phases"].items():
            if "converge_s" not in ph:
                why = ph.get("skipped") or ph.get("failed")
                rows.append(f"| {r['n']} | {r['path']} | {kind} | not measured ({why}) | | | | | | |")
                continue
            rows.append(f"| {r['n']} | {r['path']} | {kind} {ph['bytes'] // 1000} kB | {ph['converge_s']} | "
                        f"{ph['left_behind']} | {ph['broker_bytes_per_gw']:,} | {ph['registry_bytes_per_gw']:,} | "
                        f"{ph['registry_requests_per_gw']} | {r['peak_broker_rss_mb']} | "
                        f"{r['offline']['converge_after_reconnect_s']} (poll {r['offline']['poll_s']:g}) |")
    return "\n".join(rows)


async def amain(opts: argparse.Namespace) -> None:
    logs.configure(level="error")
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-", dir=ROOT / "var"))
    load_at_start = os.getloadavg()
    try:
        rel = make_releases(tmp, opts.policy_bytes, opts.module_bytes)
        results = []
        out = OUT / opts.out
        for n in opts.sizes:
            for path in opts.paths:
                print(f"N={n} path={path} …", flush=True)
                try:
                    results.append(await run_path(n, path, rel, opts, tmp, opts.kinds))
                except Exception as exc:  # a path that breaks at this N is a result too
                    print(f"  N={n} {path}: failed: {exc!r}", flush=True)
                    results.append({"n": n, "path": path, "failed": repr(exc), "phases": {}})
                out.write_text(json.dumps({  # after every run: a later failure keeps what was measured
                    "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "platform": platform.platform()},
                    "options": {k: v for k, v in vars(opts).items() if k != "worker"},
                    "load_average_at_start": load_at_start, "results": results}, indent=2))
        print(table([r for r in results if "failed" not in r]))
        print(f"wrote {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--sizes", default="100,1000,5000", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--paths", default="registry,mqtt", type=lambda s: s.split(","))
    p.add_argument("--kinds", default="policy,module", type=lambda s: s.split(","))
    p.add_argument("--workers", type=int, default=4, help="simulated-gateway processes")
    p.add_argument("--poll", type=float, default=30.0, help="the gateways' registry_poll_s")
    p.add_argument("--jitter", type=float, default=5.0, help="the gateways' registry_doorbell_jitter_s")
    p.add_argument("--limit", type=float, default=600.0, help="give a phase up after this many seconds")
    p.add_argument("--mqtt-module-max", type=int, default=1000,
                   help="largest N for the 5 MB module over retained MQTT (N x 6.7 MB through one broker)")
    p.add_argument("--out", default="registry.json", help="file name under var/bench/")
    p.add_argument("--policy-bytes", type=int, default=150_000)
    p.add_argument("--module-bytes", type=int, default=5_000_000)
    opts = p.parse_args()
    if opts.worker is not None:
        asyncio.run(worker(json.loads(opts.worker)))
        return
    asyncio.run(amain(opts))


if __name__ == "__main__":
    main()
