"""Soak: the real daemon under a steady simulated line, with broker cuts, watched for slow leaks.

A gateway must run for 30+ days unattended; what kills it then is not a crash in the first minute
but a slow leak: memory, file descriptors, threads, a table nobody trims. This runs ``edge-agent run``
(the thermostat module and the gate policy installed as signed releases, the gateway's defaults
except smaller retention bounds so the plateau is reached within the run) against a real Mosquitto
with ``scripts/demo/simulate_line.py`` publishing, restarts the broker every ``--cut-every`` seconds, and
samples the daemon's RSS, open fds, threads and database size. After the warm-up it fits a line to
each and judges: RSS growth per hour, fd and thread drift, and whether the database stopped growing.

Usage: .venv/bin/python scripts/bench/soak.py [--minutes 10] [--rate 200] [--cut-every 120]
Prints a table and writes var/bench/soak.json; exits 1 if a verdict fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agent_devkit.broker import Broker
from agent_devkit.demo import sign_and_install
from agent_devkit.procs import AgentProcess

REPO = Path(__file__).resolve().parents[2]

OUT = REPO / "var" / "bench"
RSS_SLOPE_MAX_MIB_H = 8.0  # 30 days of that is ~6 GiB: anything near it is a leak worth chasing
READINGS_MAX_ROWS = 50_000


def proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    io = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines() if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")), "write_bytes": int(io["write_bytes"])}


def db_sample(state: Path) -> dict[str, int]:
    size = sum(p.stat().st_size for p in state.glob("agent.db*") if p.is_file())
    counts: dict[str, int] = {"db_bytes": size}
    conn = sqlite3.connect(f"file:{state / 'agent.db'}?mode=ro", uri=True, timeout=5)
    try:
        for table in ("readings", "decisions", "actuations", "module_runs"):
            row = conn.execute(f"SELECT max(rowid) FROM {table}").fetchone()  # cheap: no full count
            counts[f"{table}_max_id"] = int(row[0] or 0)
        # what waits for the cloud (accounted bytes per row, incl. overhead)
        counts["outbox_bytes"] = int(conn.execute("SELECT coalesce(sum(bytes), 0) FROM outbox_classes").fetchone()[0])
        # decisions made: the audit trail counts every one (full records are only part of them)
        counts["decisions_made"] = int(conn.execute(
            "SELECT (SELECT coalesce(sum(made), 0) FROM audit_keys) + "
            "(SELECT coalesce(sum(full + rolled), 0) FROM audit_rollups)").fetchone()[0])
    except sqlite3.Error:
        pass
    finally:
        conn.close()
    return counts


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) in value per hour."""
    n = len(points)
    if n < 2:
        return 0.0
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    return 0.0 if var == 0 else sum((t - mx) * (v - my) for t, v in points) / var * 3600


def write_config(path: Path, state: Path, broker: Broker, audit_window_s: float) -> None:
    path.write_text(f"""
[agent]
node_id = "soak-gateway"
state_dir = "{state}"
log_level = "warning"
heartbeat_interval_s = 2.0

[local_broker]
host = "{broker.host}"
port = {broker.port}
client_id = "edge-agent-soak"
reconnect_min_s = 0.2
reconnect_max_s = 2.0

[pipeline]
readings_max_rows = {READINGS_MAX_ROWS}
decisions_max_rows = {READINGS_MAX_ROWS}
retention_interval_s = 10.0

[audit]
window_s = {audit_window_s}
""")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=200.0, help="sensor messages per second")
    ap.add_argument("--cut-every", type=float, default=120.0, help="restart the broker this often (0 = never)")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--audit-window", type=float, default=900.0,
                    help="[audit] window_s (default: the default); shorter shows sealed windows in a short run")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    state, config = work / "state", work / "agent.toml"
    broker = Broker(work / "mq").start()
    line: subprocess.Popen[bytes] | None = None
    agent: AgentProcess | None = None
    samples: list[dict[str, Any]] = []
    cuts = 0
    exit_code: int | None = None
    try:
        write_config(config, state, broker, args.audit_window)
        sign_and_install(work, state, config)
        agent = AgentProcess(state, config)
        agent.wait_ready()
        line = subprocess.Popen(
            [sys.executable, str(REPO / "scripts" / "demo" / "simulate_line.py"), "--host", broker.host, "--port",
             str(broker.port), "--lines", "2", "--sensors", "5", "--rate", str(args.rate), "--period", "12",
             "--malformed-every", "200"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.monotonic()
        end = started + args.minutes * 60
        next_cut = started + args.cut_every if args.cut_every > 0 else float("inf")
        while time.monotonic() < end:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"the daemon died during the soak:\n{agent.output()[-3000:]}")
            t = time.monotonic() - started
            samples.append({"t_s": round(t, 1), **proc_sample(agent.proc.pid), **db_sample(state)})
            if time.monotonic() >= next_cut:
                broker.restart()  # the line's client reconnects on its own; so must the agent
                cuts += 1
                next_cut += args.cut_every
            time.sleep(args.sample_every)
        line.terminate()
        line.wait(10)
        exit_code = agent.stop()
    finally:
        if line is not None and line.poll() is None:
            line.kill()
        if agent is not None:
            agent.close()
        broker.stop()
    result = judge(samples, args, cuts, exit_code)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    show(result)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if all(v["ok"] for v in result["verdicts"].values()) else 1


def judge(samples: list[dict[str, Any]], args: argparse.Namespace, cuts: int, exit_code: int | None) -> dict[str, Any]:
    warm = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] * 0.25] or samples
    half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] * 0.5] or samples
    rss_slope = slope_per_hour([(s["t_s"], s["rss_kib"] / 1024) for s in warm])
    fds = [s["fds"] for s in warm]
    threads = [s["threads"] for s in warm]
    # the outbox keeps every decision for the cloud (audit is never dropped, by design): its growth is
    # the backlog, reported apart; everything else must have stopped growing
    db_growth = (half[-1]["db_bytes"] - half[-1].get("outbox_bytes", 0)) - (
        half[0]["db_bytes"] - half[0].get("outbox_bytes", 0))
    outbox_per_h = slope_per_hour([(s["t_s"], s.get("outbox_bytes", 0) / 2**20) for s in half])
    elapsed = samples[-1]["t_s"] - samples[0]["t_s"]
    written_per_day = slope_per_hour([(s["t_s"], s["write_bytes"]) for s in warm]) * 24
    readings_rate = (samples[-1].get("readings_max_id", 0) - samples[0].get("readings_max_id", 0)) / max(1.0, elapsed)
    verdicts = {
        "rss": {"ok": rss_slope <= RSS_SLOPE_MAX_MIB_H,
                "detail": f"{rss_slope:+.2f} MiB/h after warm-up (limit {RSS_SLOPE_MAX_MIB_H})"},
        "fds": {"ok": max(fds) - min(fds) <= 8, "detail": f"{min(fds)}..{max(fds)} open"},
        "threads": {"ok": max(threads) - min(threads) <= 4, "detail": f"{min(threads)}..{max(threads)}"},
        "database": {"ok": db_growth <= 0.10 * half[0]["db_bytes"],
                     "detail": f"{db_growth / 2**20:+.1f} MiB over the second half without the outbox "
                               "(bounded by retention)"},
        "clean stop": {"ok": exit_code == 0, "detail": f"exit code {exit_code}"},
        "throughput": {"ok": readings_rate >= 0.5 * args.rate,
                       "detail": f"{readings_rate:,.0f} readings stored/s for {args.rate:g} msg/s sent"},
    }
    return {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "minutes": args.minutes, "rate": args.rate, "broker_cuts": cuts, "verdicts": verdicts,
            "outbox_mib_per_hour": round(outbox_per_h, 1), "written_gib_per_day": round(written_per_day / 2**30, 2),
            "decisions_made": samples[-1].get("decisions_made", 0),
            "samples": samples}


def show(result: dict[str, Any]) -> None:
    samples = result["samples"]
    step = max(1, len(samples) // 12)
    print(f"{'t (s)':>7} {'RSS MiB':>8} {'fds':>5} {'threads':>8} {'db MiB':>8} {'outbox MiB':>10} "
          f"{'readings':>10} {'decisions':>10}")
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        print(f"{s['t_s']:>7.0f} {s['rss_kib'] / 1024:>8.1f} {s['fds']:>5} {s['threads']:>8} "
              f"{s['db_bytes'] / 2**20:>8.1f} {s.get('outbox_bytes', 0) / 2**20:>10.1f} "
              f"{s.get('readings_max_id', 0):>10,} {s.get('decisions_max_id', 0):>10,}")
    print(f"\n{result['minutes']:g} min at {result['rate']:g} msg/s, {result['broker_cuts']} broker restarts; "
          f"{result['decisions_made']:,} decisions made; outbox backlog (no uplink) grows "
          f"{result['outbox_mib_per_hour']:,} MiB/h; the daemon writes {result['written_gib_per_day']} GiB/day "
          "to storage (flash wear, /proc/<pid>/io)")
    for name, v in result["verdicts"].items():
        print(f"  {'ok  ' if v['ok'] else 'FAIL'} {name:<11} {v['detail']}")
    print(f"wrote {OUT / 'soak.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
