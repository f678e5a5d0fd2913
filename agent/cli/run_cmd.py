"""``edge-agent run``: the daemon."""

from __future__ import annotations

import argparse

from agent.cli.common import add_config_options, config_from


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon (systemd Type=notify)")
    add_config_options(p)
    p.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    config = config_from(args)  # validated before anything else happens
    from agent.daemon.main import run_daemon
    return run_daemon(config, args.config, args.state_dir)
