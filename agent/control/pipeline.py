"""The control loop's back half: module outputs → policy gate → actuations / properties / events.

It is the module runtime's output sink (the composition root connects the two). For one module output:

1. every actuation and property update is put to the gate policy (see ``contract.py``); the
   evaluation is a bounded in-process Wasm call (the policy engine's epoch deadline caps it at
   ``[policy].eval_deadline_ms``; typical tens of µs), so it runs on the loop rather than paying a
   thread hop on the latency-critical path;
   The input is JSON-encoded once: the policy evaluates those bytes and the decision log stores the
   same text, next to the result set exactly as the policy wrote it;
2. ONE write job counts every decision in the audit trail and stores in full those an auditor needs
   (input, raw result, outcome, reason; see ``audit.py``), the allowed property values (latest per
   device/name), the events and the derived telemetry — the audit record exists before anything
   acts on the world;
3. allowed actuations are published on the local broker (QoS 1, in order, without waiting for the
   PUBACKs before the next module run) and their delivery (``published`` / ``failed``) recorded.
   A failed actuation is not retried later: a stale command replayed minutes after the fact is more
   dangerous than a missed one; the module's next run decides.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlite_utils

from agent import clock, jsonsafe
from agent.clock import Stamp
from agent.config.pipeline import AuditSettings, PipelineSettings
from agent.control.audit import AuditLog, signature
from agent.control.contract import Verdict, verdict
from agent.errors import AgentError
from agent.logs import get_logger
from agent.policy.engine import Policy, encode_input
from agent.policy.registry import PolicyRegistry
from agent.runtime.contract import ModuleOutput
from agent.storage import Store

log = get_logger("pipeline")

NO_POLICY = "(none)"
OUTPUT_QUEUE = 256
LAST_PROPS_MAX = 100_000


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                      puback_timeout_s: float = 5.0) -> None: ...


@dataclass
class Decided:
    kind: str
    subject: str
    input: dict[str, Any]
    result: Any
    verdict: Verdict
    policy_name: str
    policy_version: int
    item: Any
    decision_id: int = 0
    result_json: str | None = None  # the policy's own JSON text of ``result``, when it gave one
    input_json: str | None = None  # the JSON text of ``input`` the policy evaluated, when it was asked
    payload: bytes | None = None  # an allowed actuation's payload as published (encoded once, also recorded)
    error: bool = False  # the policy failed (error, deadline): always kept in full
    kept: str = ""  # why the audit trail keeps it in full ("" = rolled up into its window's count)

    def input_text(self) -> str:
        """The exact input the policy saw (what the decision log stores and the digest covers)."""
        if self.input_json is None:
            self.input_json = _strict_text(self.input)
        return self.input_json

    @property
    def requested(self) -> Any:
        return self.item.payload if self.kind == "actuation" else self.item.value


@dataclass
class Handled:
    """What one module output led to; ``delivery`` resolves to the number of actuations published."""

    decisions: list[Decided]
    delivery: asyncio.Future[int] | None


_compact = jsonsafe.dumps  # strict: what is published and logged was decoded strictly (no NaN can appear)


def _strict_text(value: Any) -> str:
    """The decision log is forwarded to the cloud (audit class): it only ever holds strict JSON. What
    cannot be encoded (the reason its evaluation failed) is logged as a string saying so."""
    try:
        return jsonsafe.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        return jsonsafe.dumps({"unencodable": f"{type(exc).__name__}: {exc}"[:500]})


def encode_payload(payload: Any) -> bytes:
    """Strings are published verbatim; everything else as compact JSON."""
    if isinstance(payload, str):
        return payload.encode()
    return _compact(payload).encode()


def _property_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is float and math.isfinite(value):
        return float.__repr__(value)  # exactly what the JSON encoder writes for a finite float
    if type(value) is int:
        return int.__repr__(value)
    return _compact(value)


def _property_type(value: Any, declared: str) -> str:
    kinds: dict[str, type | tuple[type, ...]] = {"string": str, "int": int, "integer": int,
                                                  "float": (int, float), "boolean": bool}
    want = kinds.get(declared)
    if want is not None and isinstance(value, want) and not (declared != "boolean" and isinstance(value, bool)):
        return declared
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "string"


class Pipeline:
    def __init__(self, store: Store, settings: PipelineSettings, node_id: str, *,
                 publisher: Publisher | None, policies: PolicyRegistry | None,
                 decision_policy: Callable[[], str] = lambda: "", audit: AuditSettings | None = None,
                 now: clock.Clock = clock.now) -> None:
        self.store = store
        self.now = now
        self.settings = settings
        self.audit = AuditLog(audit or AuditSettings())
        self.node_id = node_id
        self.publisher = publisher
        self.policies = policies
        self.decision_policy = decision_policy
        self.counts = {"allow": 0, "deny": 0, "modify": 0, "published": 0, "publish_failed": 0,
                       "unchanged_properties": 0}
        self._deliveries: set[asyncio.Future[int]] = set()
        self._queue: asyncio.Queue[ModuleOutput] = asyncio.Queue(maxsize=OUTPUT_QUEUE)
        self._worker = False
        # last property request per (device, name): an identical request under the same policy
        # version is not an update (no decision, no write) — modules report their state every run
        self._last_props: dict[tuple[str, str], tuple[str, Any, tuple[str, int]]] = {}

    def _policy(self) -> Policy | None:
        if self.policies is None:
            return None
        name = self.decision_policy()
        if name:
            return self.policies.get(name)
        names = self.policies.names()
        return self.policies.get(names[0]) if names else None

    def decide(self, kind: str, subject: str, doc: dict[str, Any], *, requested: Any, item: Any,
               stamp: Stamp, source: tuple[str, int]) -> Decided:
        inp = {"kind": kind, "source": {"module": source[0], "version": source[1]}, "node": self.node_id,
               kind: doc, "now": stamp.wall}
        policy = self._policy()
        if policy is None:
            allowed = self.settings.no_policy == "allow"
            v = Verdict("allow" if allowed else "deny",
                        f"no gate policy installed: {'allowed' if allowed else 'denied'} by [pipeline].no_policy",
                        requested if allowed else None)
            return Decided(kind, subject, inp, None, v, NO_POLICY, 0, item)
        text: bytes | None = None
        blob: bytes | None = None
        entrypoint = self.settings.policy_entrypoint
        try:
            # the input is encoded once: the policy evaluates these bytes and the decision log stores
            # them, so the logged input is exactly what the policy saw
            blob = encode_input(inp)
            # the result set exactly as the policy wrote it: stored as is, not re-encoded per decision
            rs, text = policy.evaluate_json(blob, entrypoint)
            raw = rs.raw
        except AgentError as exc:
            log.error("gate_policy_failed", policy=policy.name, version=policy.version, error=str(exc),
                      code=exc.code, subject=subject)
            v = Verdict("deny", f"policy evaluation failed ({exc.code}): {exc}"[:500], None)
            return Decided(kind, subject, inp, {"error": str(exc)[:500]}, v, policy.name, policy.version, item,
                           input_json=blob.decode() if blob is not None else None, error=True)
        return Decided(kind, subject, inp, raw, verdict(raw, requested, kind), policy.name, policy.version, item,
                       result_json=text.decode("utf-8", errors="replace") if text else None,
                       input_json=blob.decode())

    name = "pipeline"

    async def sink(self, output: ModuleOutput) -> None:
        """The module runtime's output sink (``runtime.set_sink(pipeline.sink)``).

        With the service running, outputs are queued (in order) so the module's next run overlaps
        this one's gate + commit; a full queue makes the module wait (back-pressure).
        """
        if self._worker:
            await self._queue.put(output)
        else:
            await self.handle(output)

    async def run(self) -> None:
        """Service ``pipeline``: handle queued module outputs one at a time, in order."""
        self._worker = True
        try:
            while True:
                output = await self._queue.get()
                try:
                    await self.handle(output)
                except AgentError as exc:  # storage trouble: logged; the module's next run decides again
                    log.error("pipeline_output_failed", module=output.name, error=str(exc), code=exc.code)
                finally:
                    self._queue.task_done()
        finally:
            self._worker = False

    async def idle(self) -> None:
        """Wait until queued outputs are handled and deliveries recorded (tests, benchmarks)."""
        if self._worker:
            await self._queue.join()
        await self.drain()

    async def reload(self, config: Any) -> None:
        """SIGHUP: the ``[pipeline]`` and ``[audit]`` keys apply from the next module output (a changed
        audit window length starts a new window)."""
        self.settings = config.pipeline
        self.audit.settings = config.audit

    def _policy_ident(self) -> tuple[str, int]:
        policy = self._policy()
        return (NO_POLICY, 0) if policy is None else (policy.name, policy.version)

    async def handle(self, output: ModuleOutput) -> Handled:
        """The module runtime's sink: gate, persist, publish. ``output`` is a ``ModuleOutput``."""
        stamp = self.now()
        source = (str(output.name), int(output.version))
        decided: list[Decided] = []
        for act in output.actuations:
            doc = {"topic": act.topic, "payload": act.payload, "qos": self.settings.actuation_qos, "retain": False}
            decided.append(self.decide("actuation", act.topic, doc, requested=act.payload, item=act,
                                       stamp=stamp, source=source))
        ident = self._policy_ident()
        for prop in output.properties:
            key = (prop.device, prop.name)
            if self._last_props.get(key) == (prop.type, prop.value, ident):
                self.counts["unchanged_properties"] += 1
                continue
            if len(self._last_props) >= LAST_PROPS_MAX:
                self._last_props.clear()
            self._last_props[key] = (prop.type, prop.value, ident)
            doc = {"device": prop.device, "name": prop.name, "value": prop.value, "type": prop.type}
            decided.append(self.decide("property", f"{prop.device}/{prop.name}", doc, requested=prop.value,
                                       item=prop, stamp=stamp, source=source))
        if not self.audit.loaded:
            await self.store.writer.run(self.audit.load_job())
        plan = self.audit.plan(stamp, [
            ((d.policy_name, d.policy_version, d.subject, d.verdict.outcome, d.verdict.reason), d.error,
             signature(d.verdict.outcome, d.requested, d.verdict.final), d.input_text().encode())
            for d in decided])
        for d, entry in zip(decided, plan.entries, strict=True):
            d.kept = entry.kept
        try:
            written = await self.store.writer.run(self._persist_job(decided, output, stamp, source[0], plan))
        except BaseException:
            self._last_props.clear()  # nothing of this output was stored: decide again next time
            raise
        if written is not None:
            self.audit.committed(plan, written)
        for d in decided:
            self.counts[d.verdict.outcome] += 1
            if d.verdict.outcome == "deny":
                log.info("actuation_denied" if d.kind == "actuation" else "property_denied",
                         module=source[0], subject=d.subject, reason=d.verdict.reason, policy=d.policy_name,
                         decision_id=d.decision_id)
        to_publish = [d for d in decided if d.kind == "actuation" and d.verdict.outcome != "deny"]
        if not to_publish:
            return Handled(decided, None)
        for d in to_publish:
            d.payload = encode_payload(d.verdict.final)
        # issue every publish now (in order: one MQTT session keeps QoS 1 order); PUBACKs and the
        # delivery record are awaited in the background so the next module run is not held up
        sends = [asyncio.ensure_future(self._publish(d)) for d in to_publish]
        delivery = asyncio.ensure_future(self._record_delivery(to_publish, sends))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)
        return Handled(decided, delivery)

    async def _record_delivery(self, sent: list[Decided], sends: Sequence[Awaitable[str | None]]) -> int:
        results = await asyncio.gather(*sends)
        rows = [(d.decision_id, d.subject, (d.payload or encode_payload(d.verdict.final)).decode(errors="replace"),
                 self.settings.actuation_qos, 0, "published" if err is None else "failed", err or "", time.time())
                for d, err in zip(sent, results, strict=True)]
        try:
            await self.store.writer.run(_actuations_job(rows))
        except AgentError as exc:
            log.error("actuation_record_failed", error=str(exc), actuations=len(rows))
        failed = sum(1 for e in results if e is not None)
        self.counts["published"] += len(results) - failed
        self.counts["publish_failed"] += failed
        return len(results) - failed

    async def drain(self) -> None:
        """Wait for the deliveries in flight (tests, shutdown)."""
        while self._deliveries:
            await asyncio.gather(*list(self._deliveries), return_exceptions=True)

    async def _publish(self, d: Decided) -> str | None:
        if self.publisher is None:
            return "no local bus configured"
        try:
            payload = d.payload if d.payload is not None else encode_payload(d.verdict.final)
            await self.publisher.publish(d.subject, payload, qos=self.settings.actuation_qos,
                                         puback_timeout_s=self.settings.publish_timeout_s)
        except AgentError as exc:
            log.warning("actuation_publish_failed", topic=d.subject, error=str(exc), decision_id=d.decision_id)
            return str(exc)[:500]
        return None

    def _persist_job(self, decided: list[Decided], output: ModuleOutput, stamp: Stamp,
                     source: str, plan: Any) -> Callable[[sqlite_utils.Database], Any]:
        def job(db: sqlite_utils.Database) -> Any:
            conn = db.conn
            win = self.audit.window_row(conn, plan) if decided else 0
            ids: list[int] = []
            for d in decided:
                if d.kept:
                    cur = conn.execute(
                        "INSERT INTO decisions (wall, boot_id, mono, policy_name, policy_version, entrypoint, input,"
                        " result, outcome, reason, subject, kept, win) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (stamp.wall, stamp.boot_id, stamp.mono, d.policy_name, d.policy_version,
                         self.settings.policy_entrypoint, d.input_text(),
                         d.result_json if d.result_json is not None else _strict_text(d.result),
                         d.verdict.outcome, d.verdict.reason, d.subject, d.kept, win))
                    d.decision_id = int(cur.lastrowid or 0)
                ids.append(d.decision_id)
                if d.kind == "property" and d.verdict.outcome != "deny":
                    value = d.verdict.final
                    conn.execute(
                        "INSERT INTO properties (device, name, value, type, source, wall, boot_id, mono)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(device, name) DO UPDATE SET"
                        " value = excluded.value, type = excluded.type, source = excluded.source,"
                        " wall = excluded.wall, boot_id = excluded.boot_id, mono = excluded.mono",
                        (d.item.device, d.item.name, _property_text(value), _property_type(value, d.item.type),
                         source, stamp.wall, stamp.boot_id, stamp.mono))
            for ev in output.events:
                conn.execute(
                    "INSERT INTO events (source, device, severity, name, data, wall, boot_id, mono)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (source, str(ev.get("device", ""))[:256], ev["severity"], str(ev.get("type", ""))[:256],
                     _compact(ev)[:8192], stamp.wall, stamp.boot_id, stamp.mono))
            if output.telemetry:
                conn.executemany(
                    "INSERT INTO readings (topic, device, metric, value, payload, wall, boot_id, mono)"
                    " VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                    [(f"derived/{source}/{t['device']}/{t['metric']}", t["device"], t["metric"], float(t["value"]),
                      float(t.get("wall", stamp.wall)), stamp.boot_id, stamp.mono) for t in output.telemetry])
            return self.audit.write(conn, plan, win, ids) if decided else None
        return job


def _actuations_job(rows: list[tuple[Any, ...]]) -> Callable[[sqlite_utils.Database], None]:
    def job(db: sqlite_utils.Database) -> None:
        db.conn.executemany("INSERT INTO actuations (decision_id, topic, payload, qos, retain, state, error, wall)"
                            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return job
