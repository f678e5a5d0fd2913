"""``edge-agent status``: the technician's view, from SQLite alone (works with the daemon down)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.common import EXIT_FAIL, EXIT_OK, add_config_options, config_from
from agent.config import AgentConfig
from agent.daemon.status import collect


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="show health, releases, links, backlog and errors (no network needed)")
    add_config_options(p)
    p.add_argument("--json", action="store_true", help="print the edge-agent.status/v1 JSON document")
    p.set_defaults(func=handle)


def gather(config: AgentConfig) -> dict[str, Any]:
    return collect(config)


def handle(args: argparse.Namespace) -> int:
    config = config_from(args)
    report = gather(config)
    if args.json:
        json.dump(report, sys.stdout, indent=2, sort_keys=False)
        sys.stdout.write("\n")
    else:
        from agent.cli.status_view import render
        sys.stdout.write(render(report))
    return EXIT_OK if report["healthy"] else EXIT_FAIL
