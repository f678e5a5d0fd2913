"""The fleet manager's side of the fleet protocol: publish a signed release, collect a rollout's statuses.

Used by ``edge-fleet push`` / ``edge-fleet rollout`` (their argument parsing lives in ``agent.cli``)
and by tests and benchmarks that play the manager.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import aiomqtt

from agent.errors import AgentError
from agent.fleet.link import LinkConfig, client_kwargs
from agent.fleet.rollout import Rollout, summary_line


class FleetToolError(AgentError):
    """Publishing to or reading from the fleet broker failed (unreachable, refused, timed out)."""

    code = "fleet_tool_error"


def release_facts(bundle: bytes) -> tuple[str, str, int]:
    """kind, name, version from the signed statement (read, not verified: the gateways verify)."""
    from agent.trust.bundle import parse_bundle
    from agent.trust.predicate import parse_predicate
    from agent.trust.statement import parse_statement

    parsed = parse_bundle(bundle)
    predicate = parse_predicate(parse_statement(parsed.envelope.payload).predicate)
    return predicate.kind, predicate.name, predicate.version


async def push(link: LinkConfig, topic: str, payload: bytes, limit_s: float = 30.0) -> None:
    try:
        async with asyncio.timeout(limit_s), aiomqtt.Client(**client_kwargs(link)) as client:
            await client.publish(topic, payload, qos=1, retain=True)
    except (aiomqtt.MqttError, TimeoutError) as exc:
        raise FleetToolError(f"could not publish to {link.url}: {exc or 'timed out'}") from exc


async def watch_rollout(link: LinkConfig, rollout: Rollout, *, watch: bool, expect: int | None,
                        limit_s: float, settle_s: float = 1.0, out: Any = None) -> Rollout:
    """Collect retained statuses (and, with ``watch``, live updates) until settled or ``limit_s``."""
    out = out or sys.stdout
    deadline = time.monotonic() + limit_s
    last_line = ""
    try:
        async with aiomqtt.Client(**client_kwargs(link)) as client:
            for flt in rollout.filters():
                await client.subscribe(flt, qos=1)
            quiet_until = time.monotonic() + settle_s
            it = client.messages.__aiter__()
            while True:
                now = time.monotonic()
                if now >= deadline:
                    break
                if not watch and now >= quiet_until:
                    break  # the retained snapshot has arrived
                if watch and rollout.settled(expect):
                    break
                try:
                    msg = await asyncio.wait_for(it.__anext__(), min(0.25, deadline - now))
                except TimeoutError:
                    continue
                payload = msg.payload if isinstance(msg.payload, bytes | bytearray) else b""
                if rollout.feed(str(msg.topic), bytes(payload)):
                    quiet_until = time.monotonic() + settle_s
                    line = summary_line(rollout.counts(expect))
                    if watch and line != last_line:
                        last_line = line
                        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=out, flush=True)
    except aiomqtt.MqttError as exc:
        raise FleetToolError(f"could not read statuses from {link.url}: {exc}") from exc
    return rollout
