"""Per-release status: persisted in SQLite, published retained on the gateway's own status topic.

One status topic per kind/name (``{prefix}/status/{node}/releases/{kind}/{name}``) holds the latest
event about that release line — what the fleet manager's ``edge-fleet rollout`` aggregates. The
payload also names the version running now (``active_version``), so a rejected push still shows
what the gateway runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlite_utils

from agent import jsonsafe
from agent.fleet.topics import Topics
from agent.logs import get_logger
from agent.storage.writer import Writer

log = get_logger("fleet")

SCHEMA = "edge-agent.release-status/v1"
STATUS_LIMITS = jsonsafe.Limits(1024 * 1024, max_depth=16)  # what a gateway reports is small and flat
# what a gateway reports; "superseded" (an older release that arrived late) stays local
STATES = ("received", "verified", "rejected", "active", "rolled_back")

Publish = Callable[[str, bytes], Awaitable[None]]


@dataclass
class ReleaseStatus:
    node_id: str
    kind: str
    name: str
    version: int | None
    state: str
    sha256: str = ""
    scope: str = ""
    code: str = ""
    message: str = ""
    shadow: dict[str, int] | None = None
    active_version: int | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()


def parse_status(payload: bytes) -> dict[str, Any] | None:
    """A status message as a dict, or None if it is not one (empty = cleared retained topic)."""
    try:
        obj = jsonsafe.loads(payload, STATUS_LIMITS)
    except jsonsafe.JsonRejected:
        return None
    return obj if isinstance(obj, dict) and obj.get("schema") == SCHEMA else None


def record_job(status: ReleaseStatus, payload: str) -> Callable[[sqlite_utils.Database], None]:
    """Store a status as the latest of its release line (and in the per-delivery audit trail)."""
    def job(db: sqlite_utils.Database) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO fleet_status (kind, name, version, state, payload, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(kind, name) DO UPDATE SET version = excluded.version, state = excluded.state, "
            "payload = excluded.payload, updated_at = excluded.updated_at",
            (status.kind, status.name, status.version, status.state, payload, now))
        if status.version is not None and status.sha256:
            shadow = status.shadow or {}
            db.execute(
                "INSERT INTO fleet_releases (kind, name, version, sha256, scope, state, code, message, "
                "shadow_evaluated, shadow_changed, received_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(kind, name, version, sha256) DO UPDATE SET state = excluded.state, "
                "code = excluded.code, message = excluded.message, updated_at = excluded.updated_at, "
                "shadow_evaluated = coalesce(excluded.shadow_evaluated, fleet_releases.shadow_evaluated), "
                "shadow_changed = coalesce(excluded.shadow_changed, fleet_releases.shadow_changed)",
                (status.kind, status.name, status.version, status.sha256, status.scope, status.state,
                 status.code, status.message[:2000], shadow.get("evaluated"), shadow.get("changed"), now, now))
    return job


def record_local_job(kind: str, name: str, version: int, sha256: str, *, scope: str, state: str,
                     message: str) -> Callable[[sqlite_utils.Database], None]:
    """Remember a delivery that is not reported (e.g. ``superseded``) so a redelivery is recognised."""
    def job(db: sqlite_utils.Database) -> None:
        now = time.time()
        db.execute(
            "INSERT INTO fleet_releases (kind, name, version, sha256, scope, state, message, received_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(kind, name, version, sha256) DO NOTHING",
            (kind, name, version, sha256, scope, state, message, now, now))
    return job


class StatusReporter:
    """Persist, then publish. Publishing goes through the link (queued while it is down)."""

    def __init__(self, node_id: str, topics: Topics, writer: Writer, publish: Publish | None = None) -> None:
        self.node_id = node_id
        self.topics = topics
        self.writer = writer
        self.publish = publish
        self.history: list[ReleaseStatus] = []  # this process's events, newest last (bounded)
        self._queue: asyncio.Queue[tuple[ReleaseStatus, asyncio.Future[None]]] | None = None
        self._worker: asyncio.Task[None] | None = None

    def report_soon(self, status: ReleaseStatus) -> asyncio.Future[None]:
        """Queue a status without waiting (intermediate states off the swap's critical path).

        One worker writes and publishes them in order, so a later :meth:`report` is never
        overtaken by an earlier ``report_soon``."""
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain(self._queue), name="fleet-status")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((status, fut))
        return fut

    async def report(self, status: ReleaseStatus) -> None:
        """Persist, then publish (queued in the link while it is down); returns when both are done."""
        await self.report_soon(status)

    async def _drain(self, queue: asyncio.Queue[tuple[ReleaseStatus, asyncio.Future[None]]]) -> None:
        while True:
            status, fut = await queue.get()
            try:
                await self._report_now(status)
            except Exception as exc:  # storage failure: the caller of report() gets it
                if not fut.done():
                    fut.set_exception(exc)
                else:
                    log.error("fleet_status_failed", error=str(exc))
                continue
            if not fut.done():
                fut.set_result(None)

    async def close(self) -> None:
        """Stop the worker; statuses still queued are dropped (the stored state is re-published at start)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        while self._queue is not None and not self._queue.empty():
            _status, fut = self._queue.get_nowait()
            fut.cancel()

    async def _report_now(self, status: ReleaseStatus) -> None:
        payload = status.to_json()
        await self.writer.run(record_job(status, payload.decode()))
        self.history.append(status)
        del self.history[:-500]
        log.info("fleet_release_status", kind=status.kind, release=status.name, version=status.version,
                 state=status.state, code=status.code or None, shadow=status.shadow)
        if self.publish is not None:
            await self.publish(self.topics.status(self.node_id, status.kind, status.name), payload)

    async def republish(self, rows: list[tuple[str, str, str]]) -> None:
        """Re-send stored statuses (kind, name, payload) — after a restart the broker may hold older ones."""
        if self.publish is None:
            return
        for kind, name, payload in rows:
            await self.publish(self.topics.status(self.node_id, kind, name), payload.encode())
