"""``edge-agent policy eval``: try a policy on the gateway (raw policy.wasm, OPA bundle, or installed release).

Prints each result set as one JSON line (``[]`` = undefined), in input order. Exit code 1 with a
clear message on any error (the offending input line is named with ``--inputs``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cli.common import EXIT_OK, add_config_options
from agent.errors import AgentError

if TYPE_CHECKING:
    from agent.policy.engine import Policy


class PolicyCliError(AgentError):
    code = "policy_cli"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="work with OPA-Wasm policies")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    ev = psub.add_parser("eval", help="evaluate a policy on one input or a JSONL file of inputs")
    add_config_options(ev)
    ev.add_argument("policy", metavar="POLICY",
                    help="policy.wasm, an OPA bundle .tar.gz, or the name of an installed policy release")
    ev.add_argument("--entrypoint", "-e", default=None, help="entrypoint path, e.g. app/rbac/allow "
                    "(default: the bundle manifest's first, else entrypoint id 0)")
    ev.add_argument("--data", type=Path, default=None, help="JSON file: the base data document")
    group = ev.add_mutually_exclusive_group(required=True)
    group.add_argument("--input", default=None, help="the input document as JSON text")
    group.add_argument("--inputs", type=Path, default=None, help="JSON Lines file, one input per line ('-' = stdin)")
    ev.set_defaults(func=handle_eval)


def _read_json_file(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyCliError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise PolicyCliError(f"{what} {path} is not valid JSON: {exc}") from exc


def _installed_policy(args: argparse.Namespace, name: str, data: dict[str, Any] | None) -> Policy:
    """The active installed policy release ``name``, loaded the way the daemon loads it (the policy
    runtime: its code from the agent's code cache, the signed predicate's default entrypoint)."""
    from agent.cli.common import config_from
    from agent.policy.runtime import PolicyRuntime
    from agent.storage import Store
    from agent.trust.releases import ReleaseStore

    config = config_from(args)
    if not config.db_path.exists():
        raise PolicyCliError(f"{name!r} is not a file, and there is no state database at {config.db_path} "
                             "to look up an installed release")
    store = Store.open(config.state_dir)
    try:
        releases = ReleaseStore(store)
        rel = releases.active("policy", name)
        if rel is None:
            raise PolicyCliError(f"{name!r} is neither a file nor an active installed policy release "
                                 "(see 'edge-agent status')")
        artifact = releases.artifact_bytes(rel.sha256)
        return PolicyRuntime(store, config.policy).load(rel, artifact, data=data)
    finally:
        store.close()


def handle_eval(args: argparse.Namespace) -> int:
    from agent.config.policy import PolicySettings
    from agent.logs import configure
    from agent.policy.engine import load_policy

    configure(level="error")  # logs go to stderr: stdout carries only result sets
    source = Path(args.policy)
    data = _read_json_file(args.data, "data file") if args.data else None
    if data is not None and not isinstance(data, dict):
        raise PolicyCliError(f"data file {args.data} must hold a JSON object")
    if source.is_file():
        policy = load_policy(source.read_bytes(), data=data, settings=PolicySettings(), name=source.name)
    elif "/" in args.policy or args.policy.endswith((".wasm", ".gz", ".tgz")):
        raise PolicyCliError(f"policy file {args.policy} does not exist")
    else:
        policy = _installed_policy(args, args.policy, data)
    out = sys.stdout
    if args.input is not None:
        try:
            doc = json.loads(args.input)
        except ValueError as exc:
            raise PolicyCliError(f"--input is not valid JSON: {exc}") from exc
        _, text = policy.evaluate_raw(doc, args.entrypoint)
        out.write(text.decode() + "\n")
        return EXIT_OK
    stream = sys.stdin if str(args.inputs) == "-" else None
    try:
        handle = stream or args.inputs.open("r", encoding="utf-8")
    except OSError as exc:
        raise PolicyCliError(f"cannot read inputs file {args.inputs}: {exc.strerror or exc}") from exc
    write = out.write
    evaluate = policy.evaluate_raw
    ep = args.entrypoint
    try:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except ValueError as exc:
                out.flush()
                raise PolicyCliError(f"{args.inputs}:{lineno}: not valid JSON: {exc}") from exc
            try:
                _, text = evaluate(doc, ep)
            except AgentError as exc:
                out.flush()
                raise PolicyCliError(f"{args.inputs}:{lineno}: {exc}") from exc
            write(text.decode())
            write("\n")
    finally:
        if stream is None:
            handle.close()
    out.flush()
    return EXIT_OK
