"""``edge-agent plan``: before deployment, does an outage at these rates fit the disk budget?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.cli.common import EXIT_FAIL, EXIT_OK, add_config_options, config_from
from agent.sync.plan import Costs, Load, plan, render


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="will an outage at these rates fit the disk budget? (what to change if not)")
    add_config_options(p)
    p.add_argument("--readings-per-s", type=_positive, required=True, help="sensor readings per second")
    p.add_argument("--decisions-per-reading", type=_positive, default=3.0,
                   help="gate decisions per reading (actuations + property updates), default 3")
    p.add_argument("--days", type=_positive, default=30.0, help="outage to ride out, default 30")
    p.add_argument("--devices", type=int, default=0, help="devices (default: one per reading per second)")
    p.add_argument("--metrics-per-device", type=int, default=1)
    p.add_argument("--events-per-s", type=float, default=0.0, help="module events per second")
    p.add_argument("--costs", type=Path, default=None,
                   help="per-record costs measured by scripts/bench/bench_outage.py (its JSON file)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    config = config_from(args)
    costs = Costs.load(args.costs)
    load = Load(args.readings_per_s, args.decisions_per_reading, args.days, devices=args.devices,
                metrics_per_device=args.metrics_per_device, events_per_s=args.events_per_s)
    result = plan(load, config, costs)
    if args.json:
        json.dump({"load": load.__dict__, **result.as_dict(), "costs": costs.__dict__}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(load, result, costs))
    return EXIT_OK if result.fits else EXIT_FAIL
