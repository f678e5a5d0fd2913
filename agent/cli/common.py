"""Shared bits of the command-line tools: options, config loading, exit codes, error printing."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.config import AgentConfig, load_config
from agent.errors import AgentError, ConfigError
from agent.logs import configure

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2



class CliError(AgentError):
    """A command cannot do what was asked with the files and options it was given."""

    code = "cli_error"


Handler = Callable[[argparse.Namespace], int]
# argparse names the type of add_subparsers() only privately
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]  # noqa: SLF001


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)")
    parser.add_argument("--state-dir", type=Path, default=None, help="override agent.state_dir")


def config_from(args: argparse.Namespace) -> AgentConfig:
    return load_config(args.config, args.state_dir)


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a file the user named, or an error saying which file and why it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the {what} {path}: {exc.strerror}") from None


def run_cli(prog: str, description: str, registrars: Sequence[Registrar], argv: Sequence[str] | None) -> int:
    """Parse, dispatch, and turn typed errors into a message and an exit code (2 = usage/config)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in registrars:
        register(sub)
    args = parser.parse_args(argv)
    handler: Handler = args.func
    # one-shot commands print their own results; their logs (stderr) carry only warnings and errors.
    # `run` reconfigures from its config file.
    configure(level="warning")
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"{prog}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except AgentError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:  # permissions, missing dirs: say what, not a traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
