"""Benchmarks of the sync package: outbox drain rate, bytes on disk per record, reconnect → twins in sync.

Runs real Mosquitto brokers on loopback. Prints a table and writes ``var/bench/sync.json``.
Usage: .venv/bin/python scripts/bench/bench_sync.py [--records 1000000] [--devices 20] [--props 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from agent.clock import now
from agent.config.sync import KubeEdgeSettings, OutboxSettings
from agent.logs import configure
from agent.storage import Store
from agent.sync.drain import Drainer
from agent.sync.kubeedge import TwinSync
from agent.sync.outbox import enqueue_job, make_record, measure_pages
from agent_devkit.broker import running_broker
from agent_devkit.edgecore import EdgeCorePeer
from agent_devkit.uplink import Consumer

REPO = Path(__file__).resolve().parents[2]


def fill(store: Store, n: int) -> float:
    started = time.perf_counter()
    stamp = now()
    chunk = 10_000
    for base in range(0, n, chunk):
        recs = [make_record("telemetry", {"d": f"press-{i % 20}", "m": "temperature", "avg": 21.5 + (i % 100) / 10,
                                          "min": 20.1, "max": 23.9, "n": 60}, f"t/{i}", stamp)
                for i in range(base, min(n, base + chunk))]
        store.writer.run_sync(enqueue_job(recs, 10**12))
    return time.perf_counter() - started


async def wait_until(cond: Callable[[], bool], limit_s: float, step: float = 0.01) -> None:
    async with asyncio.timeout(limit_s):
        while not cond():  # noqa: ASYNC110 - polling counters of other tasks
            await asyncio.sleep(step)


async def drain_bench(store: Store, url: str, host: str, port: int, n: int, inflight: int,
                      batch: int) -> dict[str, float]:
    consumer = await Consumer(host, port).start()
    settings = OutboxSettings(uplink_url=url, jitter_max_s=0, rate_limit_records_s=0, inflight=inflight,
                              batch_records=batch)
    drainer = Drainer(store, settings, "bench-gw")
    started = time.perf_counter()
    task = asyncio.create_task(drainer.run())
    try:
        await wait_until(lambda: drainer.sent_records >= n, 600)
        published = time.perf_counter() - started
        await wait_until(lambda: len(consumer.seen) >= n, 120)
        received = time.perf_counter() - started
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
    return {"records": n, "acked_s": published, "received_s": received, "records_per_s": n / published,
            "received_per_s": n / received, "unique_received": len(consumer.seen), "duplicates": consumer.duplicates,
            "batches": drainer.sent_batches}


async def twin_bench(tmp: Path, devices: int, props: int) -> dict[str, float]:
    with running_broker(tmp / "mq-twins") as broker:
        store = Store.open(tmp / "state-twins", synchronous="NORMAL")

        def set_all(gen: int) -> None:
            def job(db: object) -> None:
                conn = db.conn  # type: ignore[attr-defined]
                for d in range(devices):
                    for p in range(props):
                        conn.execute("INSERT INTO properties (device, name, value, type, wall, boot_id, mono) VALUES "
                                     "(?, ?, ?, 'float', 0, 'b', 0) ON CONFLICT(device, name) DO UPDATE SET "
                                     "value = excluded.value", (f"dev-{d}", f"p{p}", f"{gen}.{d}{p}"))
            store.writer.run_sync(job)

        set_all(1)
        bound = {f"default/dev-{d}" for d in range(devices)}
        settings = KubeEdgeSettings(enabled=True, node_name="demo-node", poll_interval_s=0.1, reconnect_max_s=1.0)
        peer = await EdgeCorePeer(broker.host, broker.port, bound=bound).start()
        sync = TwinSync(store, settings, "bench-gw", broker.host, broker.port)
        task = asyncio.create_task(sync.run())

        try:
            started = time.perf_counter()
            await wait_until(sync.in_sync.is_set, 120)
            first = time.perf_counter() - started
            # the link drops, values change while it is down, the broker comes back
            await asyncio.to_thread(broker.stop)
            set_all(2)
            await asyncio.sleep(1.0)
            await peer.stop()
            await asyncio.to_thread(broker.start)
            peer = await EdgeCorePeer(broker.host, broker.port, bound=bound).start()
            started = time.perf_counter()
            await wait_until(lambda: sync.in_sync.is_set() and len(peer.twins) == devices, 120)
            reconnect = time.perf_counter() - started
            violations = len(peer.violations)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await peer.stop()
            store.close()
    return {"devices": devices, "properties_per_device": props, "first_sync_s": first,
            "reconnect_to_in_sync_s": reconnect, "max_messages_s": settings.max_messages_s,
            "peer_violations": violations}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--inflight", type=int, default=16)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--props", type=int, default=10)
    args = ap.parse_args()
    configure("warning", "console")
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    results: dict[str, object] = {"host": platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmpdir:
        tmp = Path(tmpdir)
        store = Store.open(tmp / "state", synchronous="FULL")
        fill_s = fill(store, args.records)
        pages, accounted = measure_pages(store.path)
        db_bytes = sum(p.stat().st_size for p in tmp.glob("state/agent.db*"))
        results["enqueue"] = {"records": args.records, "seconds": fill_s, "records_per_s": args.records / fill_s,
                              "page_bytes_per_record": pages / args.records,
                              "accounted_bytes_per_record": accounted / args.records,
                              "db_file_bytes_per_record": db_bytes / args.records}
        with running_broker(tmp / "mq", extra_conf="max_queued_messages 0\n") as broker:
            results["drain"] = asyncio.run(drain_bench(store, broker.url, broker.host, broker.port, args.records,
                                                       args.inflight, args.batch))
        store.close()
        results["twins"] = asyncio.run(twin_bench(tmp, args.devices, args.props))
    e, d, t = results["enqueue"], results["drain"], results["twins"]
    assert isinstance(e, dict) and isinstance(d, dict) and isinstance(t, dict)
    rows = [
        ("enqueue rate", f"{e['records_per_s']:,.0f} records/s ({e['records']:,} records, FULL sync, 10k/commit)"),
        ("bytes on disk per record", f"{e['page_bytes_per_record']:.1f} B in pages "
                                     f"({e['db_file_bytes_per_record']:.1f} B of db file; payload ~95 B)"),
        ("drain rate (acked)", f"{d['records_per_s']:,.0f} records/s ({d['batches']:,} QoS 1 batches, "
                               f"{args.inflight} in flight, {args.batch}/batch)"),
        ("drain → consumer", f"{d['received_per_s']:,.0f} records/s, {d['unique_received']:,} unique, "
                             f"{d['duplicates']} duplicates"),
        ("twins: first sync", f"{t['first_sync_s']:.2f} s ({t['devices']} devices × "
                              f"{t['properties_per_device']} props)"),
        ("twins: reconnect → in sync", f"{t['reconnect_to_in_sync_s']:.2f} s (throttle {t['max_messages_s']} msg/s)"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    print(f"{'-' * width}  {'-' * 40}")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    out = REPO / "var" / "bench" / "sync.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
