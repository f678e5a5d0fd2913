"""Outage benchmark: does a month without uplink fit the disk at factory rates, with every decision counted?

Two parts, both through the real code of the agent (pipeline and decision log, storage, audit windows,
telemetry tiers, retention, outbox, compression, budget, drain) on a simulated clock:

1. **Full rate** (``--hours``, default 24): 200 devices x 1 reading/s, 3 gate decisions per reading (the
   fan command and the fan and temp properties, as the demo thermostat makes them), the demo gate's mix
   of allow / modify (mask, clamp) / deny, occasional transitions (a temperature above the clamp now and
   then) and a new policy version every 8 hours. Reports bytes per day at steady state, peak and final
   size of all ``agent.db*`` files, rows per table, the compression ratio, bytes written per day in this
   simulation, and the CPU per decision of the compaction (sealing, packing, retention, budget). The gate's
   answer depends only on the kind and subject of a request, so the real gate is evaluated once per
   subject and its result set replayed (evaluation cost: ``bench_policy.py``). Module runs cover 20
   devices each; one simulated second commits as a group.
2. **Thirty days at 1/600 of the rate** (20 devices, one reading a minute each), through the same parts
   as the daemon wires them: an NTP step forward and back, a reboot into 1970 in the middle, retention
   and TTLs on the boot clock; then the uplink returns and the whole backlog drains into a real Mosquitto,
   where a consumer rebuilds the per-key counts and checks them against the decisions made.

Prints tables and writes ``var/bench/outage.json``.
Usage: .venv/bin/python scripts/bench/bench_outage.py [--hours 24] [--days 30] [--skip-full] [--skip-month]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agent.config import AgentConfig
from agent.config.sync import OutboxSettings
from agent.control.pipeline import Pipeline
from agent.logs import configure
from agent.messaging.ingest import store_batch_job
from agent.messaging.readings import Reading
from agent.messaging.retention import run_retention
from agent.policy.engine import load_policy
from agent.policy.registry import PolicyRegistry
from agent.runtime.contract import ModuleOutput
from agent.storage import Store
from agent.sync.consumer import AuditTally, Key
from agent.sync.drain import Drainer
from agent.sync.outbox import Outbox
from agent.sync.service import OutboxService
from agent_devkit.broker import running_broker
from agent_devkit.gateline import Line, SimClock
from agent_devkit.opa.gate import build_gate
from agent_devkit.uplink import Consumer

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "var" / "bench"
DAY = 86_400
GIB = 1024**3
MIB = 1024**2
RUN_DEVICES = 20  # devices per module run


class ReplayGate:
    """The real gate, evaluated once per (kind, subject) and replayed: its answer depends on nothing else."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.version = inner, inner.name, inner.version
        self.memo: dict[tuple[str, str], Any] = {}

    def evaluate_json(self, blob: bytes, entrypoint: str | None = None) -> Any:
        doc = json.loads(blob)
        subject = doc["actuation"]["topic"] if doc["kind"] == "actuation" else \
            f"{doc['property']['device']}/{doc['property']['name']}"
        key = (doc["kind"], subject)
        got = self.memo.get(key)
        if got is None:
            got = self.memo[key] = self.inner.evaluate_json(blob, entrypoint)
        return got


def gate(version: int) -> ReplayGate:
    lockout = ["line1/press2"] if version % 2 else ["line1/press2", "line1/press3"]
    return ReplayGate(load_policy(build_gate(), name="gate", version=version,
                                  data={"edge": {"lockout": lockout, "actuated": ["fan"],
                                                 "limits": {"temp": [-40, 150]}}}))


def db_files(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("agent.db*") if p.is_file())


def table_rows(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for t in ("readings", "telemetry_rollups", "decisions", "audit_rollups", "audit_windows", "audit_keys",
                  "actuations", "outbox"):
            out[t] = int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
        held, plain, stored = conn.execute("SELECT sum(bytes), sum(plain_bytes), sum(stored_bytes) FROM "
                                           "outbox_classes").fetchone()
        out["outbox_held_bytes"] = int(held or 0)
        out["outbox_plain_bytes"] = int(plain or 0)
        out["outbox_stored_bytes"] = int(stored or 0)
        out["freelist_pages"] = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        return out
    finally:
        conn.close()


def write_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def merged(outputs: list[ModuleOutput]) -> list[ModuleOutput]:
    return [ModuleOutput(name="thermostat", version=1, trigger={"kind": "topic"},
                         actuations=[a for o in outputs[i:i + RUN_DEVICES] for a in o.actuations],
                         properties=[p for o in outputs[i:i + RUN_DEVICES] for p in o.properties])
            for i in range(0, len(outputs), RUN_DEVICES)]


class Sim:
    """The agent's storage-side parts on a simulated clock (what the daemon wires, minus the network)."""

    def __init__(self, state: Path, clk: SimClock, devices: int, config: AgentConfig, hot_every: int) -> None:
        self.state, self.clk, self.config = state, clk, config
        self.store = Store.open(state, synchronous=config.storage.synchronous)
        self.registry = PolicyRegistry()
        self.version = 1
        self.registry.swap("gate", gate(1))  # type: ignore[arg-type]
        self.line = Line(devices, seed=7, hot_every=hot_every)
        self.made: Counter[Key] = Counter()
        self.decisions = 0
        self.compaction_cpu = 0.0
        self.open()

    def open(self) -> None:
        cfg = self.config
        self.pipeline = Pipeline(self.store, cfg.pipeline, "bench-gw", publisher=None, policies=self.registry,
                                 audit=cfg.audit, now=self.clk)
        self.service = OutboxService(self.store, cfg.outbox, Outbox(self.store.writer, cfg.outbox), now=self.clk,
                                     telemetry=cfg.telemetry)

    def reboot(self, boot: str, down_s: float, wall_offset: float) -> None:
        """A power cut: a new boot, a fresh process (in-memory state gone), the same database."""
        self.store.close()
        self.clk.reboot(boot, down_s, wall_offset)
        self.store = Store.open(self.state, synchronous=self.config.storage.synchronous)
        self.open()

    def new_version(self) -> None:
        self.version += 1
        self.registry.swap("gate", gate(self.version))  # type: ignore[arg-type]

    async def step(self) -> None:
        """One reading per device (ingested, then decided on), at the clock's current time."""
        outputs = self.line.outputs()
        st = self.clk()
        readings = [Reading(f"factory/{o.properties[1].device}/temp", o.properties[1].device, "temp",
                            float(o.properties[1].value), None, st) for o in outputs]
        await self.store.writer.run(store_batch_job(readings, []))
        handled = await asyncio.gather(*(self.pipeline.handle(m) for m in merged(outputs)))
        for h in handled:
            for d in h.decisions:
                self.made[(d.policy_name, d.policy_version, d.subject, d.verdict.outcome, d.verdict.reason)] += 1
            self.decisions += len(h.decisions)

    async def maintain(self, expire: bool) -> None:
        c0 = time.process_time()
        await self.service.tick(expire)
        await run_retention(self.store, self.config.pipeline, self.config.telemetry, self.clk)
        self.compaction_cpu += time.process_time() - c0


async def full_rate(hours: float, devices: int, work: Path, progress: Path | None = None) -> dict[str, Any]:
    cfg = AgentConfig()
    clk = SimClock()
    state = work / "full"
    sim = Sim(state, clk, devices, cfg, hot_every=2000)
    samples: list[dict[str, Any]] = []
    w0, c0, t0 = write_bytes(), time.process_time(), time.perf_counter()
    peak = 0
    steps = int(hours * 3600)
    for s in range(steps):
        await sim.step()
        clk.t += 1.0
        if s % 30 == 29:
            await sim.maintain(expire=True)
        if s % (8 * 3600) == 8 * 3600 - 1:
            sim.new_version()
        if s % 900 == 899:
            size = db_files(state)
            peak = max(peak, size)
        if s % 3600 == 3599 or s == steps - 1:
            rows = await asyncio.to_thread(table_rows, state / "agent.db")
            samples.append({"hour": round((s + 1) / 3600, 2), "db_bytes": db_files(state), "decisions": sim.decisions,
                            "written_bytes": write_bytes() - w0, "cpu_s": round(time.process_time() - c0, 1),
                            "wall_s": round(time.perf_counter() - t0, 1), **rows})
            if progress is not None:  # a long run leaves its samples behind even if it is stopped
                await asyncio.to_thread(progress.write_text, json.dumps({"partial": True, "samples": samples}) + "\n")
            print(f"  hour {samples[-1]['hour']:>3}: state {samples[-1]['db_bytes'] / MIB:8.1f} MiB, outbox "
                  f"{rows['outbox_held_bytes'] / MIB:7.1f} MiB, decisions {sim.decisions:,}, "
                  f"{samples[-1]['wall_s']:.0f} s", flush=True)
    clk.t += 2 * cfg.audit.window_s
    await sim.maintain(expire=True)
    final = db_files(state)
    sim.store.close()
    # steady state: the last 6 hours (the raw window and the local tiers have filled by then)
    tail = samples[-7:] if len(samples) >= 7 else samples
    span_h = tail[-1]["hour"] - tail[0]["hour"] or 1
    outbox_per_day = (tail[-1]["outbox_held_bytes"] - tail[0]["outbox_held_bytes"]) / span_h * 24
    state_per_day = (tail[-1]["db_bytes"] - tail[0]["db_bytes"]) / span_h * 24
    local = tail[-1]["db_bytes"] - tail[-1]["outbox_held_bytes"]
    last = samples[-1]
    return {
        "hours": hours, "devices": devices, "decisions": sim.decisions,
        "decisions_per_s": sim.decisions / (hours * 3600),
        "state_bytes_final": final, "state_bytes_peak": max(peak, final),
        "state_growth_bytes_per_day_steady": int(state_per_day),
        "outbox_growth_bytes_per_day_steady": int(outbox_per_day),
        "projected_30d_state_bytes": int(local + 30 * outbox_per_day),
        "compression_ratio": round(last["outbox_plain_bytes"] / max(1, last["outbox_stored_bytes"]), 2),
        "written_bytes_per_day": int(last["written_bytes"] / hours * 24),
        "compaction_cpu_us_per_decision": round(sim.compaction_cpu / max(1, sim.decisions) * 1e6, 2),
        "cpu_us_per_decision_total": round((time.process_time() - c0) / max(1, sim.decisions) * 1e6, 1),
        "rows": {k: last[k] for k in ("readings", "telemetry_rollups", "decisions", "audit_rollups",
                                      "audit_windows", "audit_keys", "actuations", "outbox")},
        "samples": samples,
    }


async def month(days: int, work: Path) -> dict[str, Any]:
    """30 days at 1/600 of the rate through the daemon's parts, a reboot, clock steps, then the drain."""
    cfg = AgentConfig()
    clk = SimClock()
    state = work / "month"
    sim = Sim(state, clk, 20, cfg, hot_every=300)
    step_s = 60.0
    steps = int(days * DAY / step_s)
    reboot_at, ntp_fwd, ntp_back = steps // 2, steps // 4, steps // 4 + 60
    c0 = time.perf_counter()
    for s in range(steps):
        if s == ntp_fwd:
            clk.wall_offset = 3 * DAY  # a bad NTP server steps the clock three days ahead...
        if s == ntp_back:
            clk.wall_offset = 0.0  # ...and an hour later back
        if s == reboot_at:
            sim.reboot("boot-2", down_s=1800, wall_offset=-(clk().wall - 1000.0))  # into 1970: no RTC
        if s == reboot_at + 120:
            clk.wall_offset = 0.0  # NTP fixes the clock two hours after the reboot
        if s % (7 * 24 * 60) == 7 * 24 * 60 - 1:
            sim.new_version()
        await sim.step()
        clk.t += step_s
        if s % 5 == 4:
            await sim.maintain(expire=s % 30 == 29)
    clk.t += 2 * cfg.audit.window_s
    await sim.maintain(expire=True)
    simulate_s = time.perf_counter() - c0
    rows = table_rows(state / "agent.db")
    conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
    tiers = dict(conn.execute("SELECT res, count(*) FROM telemetry_rollups GROUP BY res").fetchall())
    expired = conn.execute("SELECT sum(expired) FROM outbox_classes").fetchone()[0]
    conn.close()
    # the uplink returns: drain everything into a real Mosquitto; the consumer rebuilds the counts
    with running_broker(work / "mq") as broker:
        consumer = await Consumer(broker.host, broker.port).start()
        settings = OutboxSettings(uplink_url=broker.url, jitter_max_s=0, rate_limit_records_s=0)
        drainer = Drainer(sim.store, settings, "bench-gw")
        task = asyncio.create_task(drainer.run())
        t0 = time.perf_counter()
        async with asyncio.timeout(600):
            while True:
                await asyncio.sleep(0.2)
                conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True)
                left = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
                conn.close()
                if left == 0 and len(consumer.unique) >= rows["outbox"]:
                    break
        drain_s = time.perf_counter() - t0
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await consumer.stop()
    tally = AuditTally()
    for key, payload in consumer.payloads.items():
        tally.add(key, payload)
    sim.store.close()
    unaccounted = sum((sim.made - tally.made).values()) + sum((tally.made - sim.made).values())
    return {
        "days": days, "devices": 20, "step_s": step_s, "decisions": sim.decisions, "simulate_s": round(simulate_s, 1),
        "outbox_records": rows["outbox"], "drain_s": round(drain_s, 2), "duplicates": consumer.duplicates,
        "consumer_decisions": tally.total, "unaccounted": unaccounted, "consumer_problems": tally.problems[:5],
        "windows": tally.windows, "kept": dict(tally.kept), "gaps": len(tally.gaps),
        "rollups_1m_kept": int(tiers.get(60, 0)), "rollups_1h_kept": int(tiers.get(3600, 0)),
        "readings_kept": rows["readings"], "expired": int(expired or 0),
        "state_bytes": db_files(state),
    }


def show(result: dict[str, Any]) -> None:
    f = result.get("full")
    if f:
        print(f"\nFull rate, {f['hours']:g} simulated hours, {f['devices']} devices, {f['decisions']:,} decisions "
              f"({f['decisions_per_s']:.0f}/s)")
        rows = [("state on disk, final / peak (all agent.db*)",
                 f"{f['state_bytes_final'] / MIB:.0f} / {f['state_bytes_peak'] / MIB:.0f} MiB"),
                ("growth at steady state (whole state / outbox)",
                 f"{f['state_growth_bytes_per_day_steady'] / MIB:.1f} / "
                 f"{f['outbox_growth_bytes_per_day_steady'] / MIB:.1f} MiB/day"),
                ("projected 30-day state", f"{f['projected_30d_state_bytes'] / MIB:.0f} MiB (target <= 1024)"),
                ("outbox compression ratio", f"{f['compression_ratio']}x"),
                ("bytes written per day (simulation)", f"{f['written_bytes_per_day'] / GIB:.2f} GiB"),
                ("compaction CPU per decision", f"{f['compaction_cpu_us_per_decision']} us"),
                ("all CPU per decision (pipeline + storage)", f"{f['cpu_us_per_decision_total']} us"),
                ("rows at the end", ", ".join(f"{k} {v:,}" for k, v in f["rows"].items()))]
        for k, v in rows:
            print(f"  {k:<46} {v}")
    m = result.get("month")
    if m:
        print(f"\n{m['days']} days at 1/600 rate ({m['devices']} devices, a reading a minute), reboot + clock steps")
        rows = [("decisions made / counted by the consumer", f"{m['decisions']:,} / {m['consumer_decisions']:,}"),
                ("decisions unaccounted", f"{m['unaccounted']}"),
                ("drain of the backlog into Mosquitto", f"{m['outbox_records']:,} records in {m['drain_s']} s, "
                                                        f"{m['duplicates']} duplicates"),
                ("windows / full records kept", f"{m['windows']:,} / {sum(m['kept'].values()):,} {m['kept']}"),
                ("telemetry tiers kept (1m / 1h rows)", f"{m['rollups_1m_kept']:,} / {m['rollups_1h_kept']:,}"),
                ("state on disk", f"{m['state_bytes'] / MIB:.1f} MiB")]
        for k, v in rows:
            print(f"  {k:<46} {v}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=24.0, help="simulated hours at the full rate")
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--days", type=int, default=30, help="simulated days at 1/600 of the rate")
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--skip-month", action="store_true")
    ap.add_argument("--out", default=str(OUT / "outage.json"))
    args = ap.parse_args()
    configure("error", "console")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt: "pending publish calls" while draining
    result: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                              "date": time.strftime("%Y-%m-%d"), "defaults": True}
    with tempfile.TemporaryDirectory(prefix="bench-outage-", dir=REPO / "var") as tmp:
        work = Path(tmp)
        if not args.skip_full:
            result["full"] = asyncio.run(full_rate(args.hours, args.devices, work,
                                                   Path(args.out).with_suffix(".partial.json")))
        if not args.skip_month:
            result["month"] = asyncio.run(month(args.days, work))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    print(f"\nwrote {out}")
    m = result.get("month")
    return 1 if m and m["unaccounted"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
