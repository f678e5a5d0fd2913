#!/usr/bin/env python3
"""A simulated production line: sensors publishing readings under factory/<line>/<sensor>/… (QoS 1).

Each sensor's temperature follows a slow wave with noise, so presses heat past 30 °C and cool below
27 °C every ``--period`` seconds (the thermostat example turns their fans on and off). Also sends an
``rpm``/``pressure`` pair as one JSON object on ``factory/<line>/<sensor>`` and, with
``--malformed-every N``, one broken payload every N messages (the agent rejects and logs it).

    scripts/demo/simulate_line.py --port 1883 --rate 20 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import signal
import sys
import time

import aiomqtt

MALFORMED = [b"overheating!", b'{"temp": 31}', b"\xff\xfe", b"NaN"]


def reading(line: int, sensor: int, t: float, period: float, rng: random.Random) -> float:
    phase = (sensor * 0.37 + line * 0.11) * 2 * math.pi
    return round(28.5 + 4.5 * math.sin(2 * math.pi * t / period + phase) + rng.gauss(0, 0.3), 2)


async def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    sent = acked = malformed = 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    devices = [(ln, s) for ln in range(1, args.lines + 1) for s in range(1, args.sensors + 1)]
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    start = time.monotonic()
    in_flight = asyncio.Semaphore(args.in_flight)
    pending: set[asyncio.Task[None]] = set()

    lost = asyncio.Event()  # the broker went away: reconnect, as a real sensor gateway does

    async def publish(client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        nonlocal acked
        try:
            await client.publish(topic, payload, qos=args.qos, timeout=10)
            acked += 1
        except aiomqtt.MqttError as exc:
            print(f"simulate_line: publish to {topic} failed: {exc}", file=sys.stderr)
            lost.set()
        finally:
            in_flight.release()

    def done() -> bool:
        return stop.is_set() or bool(args.count and sent >= args.count) or bool(
            args.duration and time.monotonic() - start >= args.duration)

    i = 0
    while not done():
        lost.clear()
        try:
            async with aiomqtt.Client(args.host, args.port, identifier=args.client_id,
                                      max_inflight_messages=args.in_flight) as client:
                client.pending_calls_threshold = 10_000
                while not done() and not lost.is_set():
                    ln, s = devices[i % len(devices)]
                    t = time.monotonic() - start
                    if args.malformed_every and sent and sent % args.malformed_every == 0:
                        topic, payload = f"factory/line{ln}/press{s}/temp", MALFORMED[malformed % len(MALFORMED)]
                        malformed += 1
                    elif i % 5 == 4:
                        topic = f"factory/line{ln}/press{s}"
                        payload = json.dumps({"rpm": round(1200 + rng.gauss(0, 15)), "pressure": round(
                            6 + rng.gauss(0, 0.1), 2)}).encode()
                    else:
                        topic = f"factory/line{ln}/press{s}/temp"
                        payload = json.dumps(reading(ln, s, t, args.period, rng)).encode()
                    await in_flight.acquire()
                    task = asyncio.create_task(publish(client, topic, payload))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    sent += 1
                    i += 1
                    if interval:
                        delay = start + sent * interval - time.monotonic()
                        if delay > 0:
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(stop.wait(), delay)
                    if args.verbose and sent % max(1, int(args.rate or 100) * 5) == 0:
                        print(f"simulate_line: sent {sent}, acked {acked}, malformed {malformed}", flush=True)
                if pending:
                    await asyncio.wait(pending, timeout=15)
        except aiomqtt.MqttError as exc:
            print(f"simulate_line: broker {args.host}:{args.port} unavailable ({exc}); retrying", file=sys.stderr)
        if not done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    print(json.dumps({"sent": sent, "acked": acked, "malformed": malformed,
                      "seconds": round(time.monotonic() - start, 2)}))
    return 0 if acked == sent else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--client-id", default="simulated-line")
    p.add_argument("--lines", type=int, default=1)
    p.add_argument("--sensors", type=int, default=3)
    p.add_argument("--rate", type=float, default=10.0, help="messages per second (0 = as fast as possible)")
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (0 = until --count or Ctrl-C)")
    p.add_argument("--count", type=int, default=0, help="messages to send (0 = no limit)")
    p.add_argument("--period", type=float, default=20.0, help="seconds of one heat/cool cycle")
    p.add_argument("--malformed-every", type=int, default=0)
    p.add_argument("--qos", type=int, default=1, choices=(0, 1))
    p.add_argument("--in-flight", type=int, default=20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--verbose", action="store_true")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
