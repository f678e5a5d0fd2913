#!/usr/bin/env python3
"""The demo's simulated EdgeCore: the strict EdgeCore test peer (agent_devkit/edgecore.py) as a process.

There is no real EdgeCore on a demo box, so the demo runs the same peer the sync tests use — it
validates every message by EdgeCore's rules and answers as EdgeCore does — bound to the devices of
``configs/kubeedge/device.yaml`` whose ``spec.nodeName`` is the agent's KubeEdge node; each twin
starts with the type its DeviceModel property declares (as EdgeCore creates twins from the model).

  edgecore_sim.py serve --config configs/demo.toml --state var/demo/edgecore-twins.json
      plays EdgeCore on the agent's broker until SIGTERM; writes the twins it holds to --state on
      every change; SIGUSR1 (and the stop) prints them to stdout.
  edgecore_sim.py compare --config configs/demo.toml --state var/demo/edgecore-twins.json
      waits (bounded) until the twins EdgeCore holds equal the agent's latest properties (mapped by
      the [kubeedge] tables); prints both; exit 0 if equal, 1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentConfig, load_config
from agent.storage.db import connect_reader
from agent.sync import twins
from agent.sync.twins import TwinValueError
from agent_devkit.edgecore import EdgeCorePeer, Twin

REPO = Path(__file__).resolve().parents[2]

TYPE_OF_MODEL = {"FLOAT": "float", "DOUBLE": "float", "INT": "int", "BOOLEAN": "boolean", "STRING": "string"}
KUBEEDGE_DIR = REPO / "configs" / "kubeedge"


def say(text: str) -> None:
    print(text, flush=True)


def device_id(namespace: str, name: str, topic_style: str) -> str:
    return f"{namespace}/{name}" if topic_style == "v1.17" else name


def read_manifests(devices: Path, models: Path, node: str, topic_style: str
                   ) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """(bound device id -> {twin: type} from its model, unbound device id -> its node)."""
    model_types: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(models.read_text()):
        if doc and doc.get("kind") == "DeviceModel":
            model_types[doc["metadata"]["name"]] = {
                p["name"]: TYPE_OF_MODEL.get(str(p.get("type", "STRING")).upper(), "string")
                for p in doc["spec"].get("properties", [])}
    bound: dict[str, dict[str, str]] = {}
    unbound: dict[str, str] = {}
    for doc in yaml.safe_load_all(devices.read_text()):
        if not doc or doc.get("kind") != "Device":
            continue
        meta, spec = doc["metadata"], doc["spec"]
        dev = device_id(str(meta.get("namespace", "default")), str(meta["name"]), topic_style)
        if spec.get("nodeName") == node:
            bound[dev] = dict(model_types.get(spec["deviceModelRef"]["name"], {}))
        else:
            unbound[dev] = str(spec.get("nodeName", ""))
    return bound, unbound


def held(peer: EdgeCorePeer) -> dict[str, dict[str, str]]:
    """The twins with a value EdgeCore holds, per bound device."""
    return {dev: {k: v for k, v in sorted(peer.values(dev).items()) if v is not None} for dev in sorted(peer.bound)}


def table(rows: Sequence[tuple[str, ...]], head: tuple[str, ...]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [head, *rows]]
    lines.insert(1, "  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def dump(peer: EdgeCorePeer, unbound: dict[str, str], why: str) -> None:
    rows = [(dev, name, value) for dev, tw in held(peer).items() for name, value in tw.items()]
    say(f"--- twin state EdgeCore (node {peer.node}) holds ({why}); {peer.updates} twin updates received, "
        f"{len(peer.violations)} rejected")
    say(table(rows, ("device", "twin", "actual value")) if rows else "  (no twins yet)")
    for dev, node in sorted(unbound.items()):
        say(f"  {dev}: not bound to {peer.node} (spec.nodeName {node or '(none)'}): no twins here")
    for v in peer.violations[-5:]:
        say(f"  rejected: {v}")
    say("---")


def write_state(path: Path, peer: EdgeCorePeer, unbound: dict[str, str]) -> str:
    text = json.dumps({"node": peer.node, "bound": sorted(peer.bound), "unbound": unbound, "twins": held(peer),
                       "states": dict(sorted(peer.states.items())), "updates": peer.updates,
                       "violations": peer.violations[-20:]}, indent=1, sort_keys=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


def broker_of(config: AgentConfig) -> tuple[str, int, str]:
    ke = config.kubeedge
    return (ke.host or config.local_broker.host, ke.port or config.local_broker.port,
            ke.node_name or config.node_id)


async def serve(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    host, port, node = broker_of(config)
    style = config.kubeedge.topic_style
    bound, unbound = read_manifests(Path(args.devices), Path(args.models), node, style)
    peer = EdgeCorePeer(host, port, node=node, topic_style=style, bound=set(bound))
    for dev, types in bound.items():
        peer.twins[dev] = {name: Twin(None, ttype) for name, ttype in types.items()}
    say(f"simulated EdgeCore: node {node}, broker {host}:{port}, topics {style}")
    say(f"  bound to {node}: {', '.join(sorted(bound)) or '(none)'}")
    for dev, other in sorted(unbound.items()):
        say(f"  NOT bound to {node}: {dev} (spec.nodeName {other or '(none)'}): its twin updates get 404")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: dump(peer, unbound, "on request"))
    await peer.start()
    say(f"connected to {host}:{port} (clean session, QoS 1): answering twin, state and membership requests")
    state = Path(args.state)
    last = ""
    try:
        while not stop.is_set():
            text = json.dumps([held(peer), peer.updates, len(peer.violations)])
            if text != last:
                last = text
                write_state(state, peer, unbound)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        await peer.stop()
        write_state(state, peer, unbound)
        dump(peer, unbound, "at stop")
    return 0


def expected_twins(config: AgentConfig) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The twins the agent's latest properties map to (device id -> twin -> value), and problems."""
    expected: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    conn: sqlite3.Connection = connect_reader(config.db_path)
    try:
        rows = conn.execute("SELECT device, name, value, type FROM properties ORDER BY device, name").fetchall()
    finally:
        conn.close()
    for device, prop, value, ptype in rows:
        try:
            ref = twins.resolve(config.kubeedge, str(device))
            name = None if ref is None else ref.twin_name(str(prop))
            if ref is None or name is None:
                continue
            expected.setdefault(ref.device_id, {})[name] = twins.normalise(str(value), twins.twin_type(str(ptype)))
        except TwinValueError as exc:
            problems.append(f"{device}/{prop}: {exc}")
    return expected, problems


def compare(args: argparse.Namespace) -> int:
    config = load_config(Path(args.config))
    deadline = time.monotonic() + args.timeout
    while True:
        state: dict[str, Any] = json.loads(Path(args.state).read_text()) if Path(args.state).exists() else {}
        expected, problems = expected_twins(config)
        holds: dict[str, dict[str, str]] = state.get("twins", {})
        bound = set(state.get("bound", []))
        mine = {dev: tw for dev, tw in expected.items() if dev in bound}
        equal = bool(state) and all(holds.get(dev, {}) == mine.get(dev, {}) for dev in bound)
        if equal or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    rows = []
    for dev in sorted(set(expected) | bound):
        for name in sorted(set(expected.get(dev, {})) | set(holds.get(dev, {}))):
            rows.append((dev, name, expected.get(dev, {}).get(name, "-"), holds.get(dev, {}).get(name, "-")
                         if dev in bound else "(not bound here)"))
    say(table(rows, ("KubeEdge device", "twin", "agent property", "EdgeCore twin")))
    for dev, node in sorted(state.get("unbound", {}).items()):
        if dev in expected:
            say(f"  {dev} is bound to node {node}, not {state.get('node')}: EdgeCore keeps no twin of it here")
    for p in problems:
        say(f"  not publishable: {p}")
    if equal:
        say(f"EdgeCore's twins == the agent's latest properties ({len(mine)} bound devices, "
            f"{sum(len(t) for t in mine.values())} twins)")
        return 0
    say(f"EdgeCore's twins differ from the agent's latest properties after {args.timeout:.0f} s")
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="play EdgeCore on the agent's broker until SIGTERM")
    s.add_argument("--config", required=True, help="the agent's config (broker, [kubeedge] node and topics)")
    s.add_argument("--devices", default=str(KUBEEDGE_DIR / "device.yaml"))
    s.add_argument("--models", default=str(KUBEEDGE_DIR / "devicemodel.yaml"))
    s.add_argument("--state", required=True, help="JSON file of the twins held, rewritten on every change")
    c = sub.add_parser("compare", help="twins held == the agent's latest properties?")
    c.add_argument("--config", required=True)
    c.add_argument("--state", required=True)
    c.add_argument("--timeout", type=float, default=15.0, help="wait at most this long for equality")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        return asyncio.run(serve(args))
    return compare(args)


if __name__ == "__main__":
    raise SystemExit(main())
