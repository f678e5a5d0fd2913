"""``edge-agent``: the gateway-side command (daemon, status, trust, install, policy eval, …)."""

from __future__ import annotations

from collections.abc import Sequence

from agent.cli import plan_cmd, policy_cmd, run_cmd, status_cmd, trust_cmd
from agent.cli.common import Registrar, run_cli

COMMANDS: list[Registrar] = [run_cmd.register, status_cmd.register, trust_cmd.register_trust,
                             trust_cmd.register_install, policy_cmd.register, plan_cmd.register]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli("edge-agent", "Offline-autonomous IoT edge agent (gateway side).", COMMANDS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
