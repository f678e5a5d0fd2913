"""``edge-fleet``: the fleet manager's tool (keys, signing, pushing releases, watching rollouts)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.cli import keys_cmd, push_cmd, registry_cmd
from agent.cli.common import Registrar, run_cli

COMMANDS: list[Registrar] = [keys_cmd.register, push_cmd.register_push, push_cmd.register_rollout,
                             registry_cmd.register_publish, registry_cmd.register_export]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-fleet", "Fleet manager's tool for edge-agent releases.", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
