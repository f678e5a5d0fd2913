"""``edge-fleet``: the fleet manager's tool (keys, signing, pushing releases, watching rollouts)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.cli.common import Registrar, run_cli
from agent.fleet import cli as fleet_push_cli
from agent.trust import fleet_cli

COMMANDS: list[Registrar] = [fleet_cli.register, fleet_push_cli.register_push, fleet_push_cli.register_rollout]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-fleet", "Fleet manager's tool for edge-agent releases.", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
