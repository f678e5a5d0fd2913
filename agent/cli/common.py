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


class FileTooLarge(CliError):
    """A file the user named is larger than the command accepts (it was not read to its end)."""

    code = "oversize"


MAX_SMALL_FILE_BYTES = 1024 * 1024  # keys, key sets, metadata: far smaller in practice


Handler = Callable[[argparse.Namespace], int]
# argparse names the type of add_subparsers() only privately
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]  # noqa: SLF001


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="config file (default: $EDGE_AGENT_CONFIG or /etc/edge-agent/agent.toml)")
    parser.add_argument("--state-dir", type=Path, default=None, help="override agent.state_dir")


def config_from(args: argparse.Namespace) -> AgentConfig:
    return load_config(args.config, args.state_dir)


def read_file(path: Path, what: str, limit: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The bytes of a file the user named, or an error saying which file and why it cannot be read.

    Never more than ``limit`` + 1 bytes are read: ``install /dev/zero`` (or a FIFO, or a file that keeps
    growing) is refused after one byte past the limit, not after it filled memory."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise CliError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise FileTooLarge(f"the {what} {path} is larger than {limit} bytes, the most this command accepts")
    return data


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
