"""``edge-fleet push`` and ``edge-fleet rollout``: publish a signed release, watch it converge."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

from agent.cli.common import EXIT_FAIL, EXIT_OK, read_file
from agent.fleet.envelope import encode
from agent.fleet.link import LinkConfig
from agent.fleet.manager import push, release_facts, watch_rollout
from agent.fleet.rollout import Rollout, table
from agent.fleet.topics import DEFAULT_PREFIX, Scope, Topics


def _broker_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, help="fleet broker URL, mqtt://host:port or mqtts://host:port")
    parser.add_argument("--ca", default="", help="PEM CA file that signed the broker certificate (mqtts)")
    parser.add_argument("--cert", default="", help="client certificate PEM (mutual TLS)")
    parser.add_argument("--key", default="", help="client private key PEM (mutual TLS)")
    parser.add_argument("--username", default="", help="MQTT user name")
    parser.add_argument("--password-env", default="", metavar="VAR",
                        help="name of an environment variable holding the MQTT password (never on the command line)")
    parser.add_argument("--client-id", default="", help="MQTT client id (default: a random edge-fleet-… id)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix (default {DEFAULT_PREFIX})")


def _link(args: argparse.Namespace) -> LinkConfig:
    password = os.environ.get(args.password_env, "") if args.password_env else ""
    return LinkConfig(url=args.broker, client_id=args.client_id or f"edge-fleet-{uuid.uuid4().hex[:12]}",
                      username=args.username, password=password, tls_ca=args.ca, tls_cert=args.cert,
                      tls_key=args.key, clean_session=True)


# --------------------------------------------------------------------------------------------- push

def _cmd_push(args: argparse.Namespace) -> int:
    from agent.trust.bundle import MAX_BUNDLE_BYTES
    from agent.trust.verify import DEFAULT_MAX_ARTIFACT_BYTES

    artifact = read_file(Path(args.artifact), "artifact", DEFAULT_MAX_ARTIFACT_BYTES)
    bundle = read_file(Path(args.bundle), "bundle", MAX_BUNDLE_BYTES)
    kind, name, version = release_facts(bundle)
    scope = Scope.parse(args.target)
    topic = Topics(args.prefix).release(scope, kind, name)
    payload = b"" if args.clear else encode(kind, name, version, artifact, bundle)
    started = time.perf_counter()
    asyncio.run(push(_link(args), topic, payload, args.timeout))
    what = "cleared" if args.clear else f"published {kind} {name} v{version} ({len(payload)} bytes)"
    print(f"{what} on {topic} in {(time.perf_counter() - started) * 1000:.0f} ms (retained)")
    return EXIT_OK


# ------------------------------------------------------------------------------------------ rollout

def _cmd_rollout(args: argparse.Namespace) -> int:
    rollout = Rollout(args.kind, args.name, args.version, Topics(args.prefix))
    asyncio.run(watch_rollout(_link(args), rollout, watch=args.watch, expect=args.expect, limit_s=args.timeout))
    if args.json:
        print(json.dumps({"kind": args.kind, "name": args.name, "version": args.version,
                          "counts": rollout.counts(args.expect), "gateways": rollout.rows()}, indent=2))
    else:
        print(table(rollout, args.expect))
    counts = rollout.counts(args.expect)
    return EXIT_OK if counts["active"] > 0 and counts["active"] == sum(counts.values()) else EXIT_FAIL


def register_push(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("push", help="publish a signed release (retained) to a target scope")
    p.add_argument("artifact", help="the artifact (.wasm or OPA bundle .tar.gz)")
    p.add_argument("--bundle", required=True, help="its Sigstore bundle (edge-fleet sign / cosign attest-blob)")
    p.add_argument("--target", required=True,
                   help="all | site/<site> | group/<group> | gw/<node-id>")
    p.add_argument("--clear", action="store_true",
                   help="clear the retained release of this scope instead (uninstalls nothing on gateways)")
    p.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    _broker_options(p)
    p.set_defaults(func=_cmd_push)


def register_rollout(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rollout", help="aggregate gateway statuses of a release into a table")
    p.add_argument("--kind", required=True, choices=("policy", "module"))
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, type=int)
    p.add_argument("--watch", action="store_true", help="keep updating until every gateway settled (or --timeout)")
    p.add_argument("--expect", type=int, default=None, help="number of gateways expected (missing ones = pending)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds to wait (default: 3 s snapshot, 600 s with --watch)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    _broker_options(p)

    def run(args: argparse.Namespace) -> int:
        if args.timeout is None:
            args.timeout = 600.0 if args.watch else 3.0
        return _cmd_rollout(args)
    p.set_defaults(func=run)
