"""Hostile sensor readings over a real Mosquitto into a real SQLite store: each bad message is refused,
acknowledged, kept as a reject row and counted; every good reading around it is stored exactly once;
the bus never reconnects because of a payload (issue 11: defects 2, 9, the lone-surrogate metric)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import jsonsafe
from agent.clock import now
from agent.config.model import LocalBrokerSettings
from agent.messaging.bus import LocalBus
from agent.messaging.ingest import Ingest
from agent.messaging.readings import MalformedReading, parse
from agent.storage import Store
from agent_devkit.broker import Broker
from agent_devkit.hostile import json_values, render, with_hostile_leaf
from agent_devkit.localbus import persistent_broker, publish_counted


class Bench:
    """The daemon's ingest path in-process: bus + ingest on a real store."""

    def __init__(self, broker: Broker, store: Store) -> None:
        settings = LocalBrokerSettings(host=broker.host, port=broker.port, client_id="t-hostile",
                                       reconnect_min_s=0.05, reconnect_max_s=0.5)
        self.store = store
        self.bus = LocalBus(settings, "node")
        self.ingest = Ingest(store, batch_max=64, on_store_failure=self.bus.request_reconnect)
        self.bus.subscribe("factory/#", self.ingest.handle, manual_ack=True)
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Bench:
        self.tasks = [asyncio.create_task(self.bus.run()), asyncio.create_task(self.ingest.run())]
        assert await self.bus.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.store.rejects.flush()


async def until(cond: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    conn = store.reader()
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def good(i: int) -> tuple[str, bytes]:
    return f"factory/l1/s{i % 3}/temp", json.dumps({"value": i + 0.5, "seq": i}).encode()


def run_mix(tmp_path: Path, store: Store, bad: list[tuple[str, bytes]], n_good: int = 60) -> Bench:
    """Publish good readings with the bad ones in the middle (same batches); wait until every message
    was acknowledged. A payload that stalls ingest or makes the bus reconnect fails here."""
    items = [good(i) for i in range(n_good // 2)] + bad + [good(i) for i in range(n_good // 2, n_good)]

    async def scenario(broker: Broker) -> Bench:
        async with Bench(broker, store) as b:
            acked = await publish_counted(broker.host, broker.port, items, client_id="t-pub")
            assert len(acked) == len(items)
            await until(lambda: b.bus.acked >= len(items), 20, f"all {len(items)} messages acknowledged "
                        f"(acked {b.bus.acked}, connects {b.bus.connects})")
            assert b.bus.connects == 1, "a payload made the bus reconnect (redelivery loop)"
            return b

    with persistent_broker(tmp_path / "mq") as broker:
        return asyncio.run(scenario(broker))


def stored_seqs(store: Store) -> list[int]:
    return sorted(int(r[0]) for r in rows(store, "SELECT json_extract(payload, '$.seq') FROM readings"
                                                 " WHERE payload LIKE '%seq%'"))


def test_a_huge_integer_reading_is_refused_and_does_not_stall_ingest(tmp_path: Path, store: Store) -> None:
    """Defect 2: float() of a 309+-digit integer raised OverflowError in the handler; the message stayed
    unacked, the bus reconnected and the broker redelivered it for ever."""
    huge = b"9" * 309
    bad = [("factory/l1/s9/temp", huge), ("factory/l1/s9/temp", b'{"value": ' + huge + b"}"),
           ("factory/l1/s9", b'{"temp": ' + huge + b"}")]
    b = run_mix(tmp_path, store, bad)
    assert stored_seqs(store) == list(range(60))  # every good reading, exactly once
    rejects = rows(store, "SELECT topic, error FROM rejects ORDER BY id")
    assert [t for t, _ in rejects] == [t for t, _ in bad]
    assert all("outside the accepted range" in e for _, e in rejects)
    assert b.ingest.rejected == 3
    assert rows(store, "SELECT source, code, count FROM input_rejects") == [
        ("local_bus", "json_integer_out_of_range", 3)]


def test_a_lone_surrogate_metric_name_rejects_that_message_only(tmp_path: Path, store: Store) -> None:
    """Addendum: {"\\ud800": 1} on <root>/<line>/<sensor> failed the whole ingest batch (UnicodeEncodeError
    in SQLite): the other sensors' readings were lost from it and the session looped for ever."""
    bad = [("factory/l1/s9", b'{"\\ud800": 1, "rpm": 2}'), ("factory/l1/s9/temp", b'{"value": 1, "n": "\\udfff"}')]
    run_mix(tmp_path, store, bad)
    assert stored_seqs(store) == list(range(60))
    assert rows(store, "SELECT count(*) FROM readings WHERE device = 'l1/s9'") == [(0,)]
    assert [c for _, c, _ in rows(store, "SELECT source, code, count FROM input_rejects")] == ["json_lone_surrogate"]


def test_non_finite_numbers_inside_readings_are_never_stored(tmp_path: Path, store: Store) -> None:
    """Defect 9: NaN inside a reading object was stored in the payload column (and forwarded on)."""
    bad = [("factory/l1/s9/temp", b'{"value": 1, "x": NaN}'), ("factory/l1/s9/temp", b'{"value": 1e400}'),
           ("factory/l1/s9/temp", b'[1, {"value": 2, "y": [-Infinity]}]'), ("factory/l1/s9", b'{"t": Infinity}')]
    run_mix(tmp_path, store, bad)
    assert stored_seqs(store) == list(range(60))
    assert rows(store, "SELECT count(*) FROM readings WHERE device = 'l1/s9'") == [(0,)]
    for (payload,) in rows(store, "SELECT payload FROM readings WHERE payload IS NOT NULL"):
        jsonsafe.loads(payload.encode(), jsonsafe.Limits(1 << 16))  # strict JSON, every one
    assert rows(store, "SELECT code, count FROM input_rejects") == [("json_non_finite", 4)]


# ---- properties of the reading parser ---------------------------------------------------------------

TOPICS = st.sampled_from(["factory/l/s/m", "factory/l/s"])
READING_SHAPES = st.one_of(
    json_values(6).map(lambda v: json.dumps(v).encode()),
    with_hostile_leaf(json_values(6)).map(lambda t: render(t).encode()),
    with_hostile_leaf(st.fixed_dictionaries({"value": json_values(2)})).map(lambda t: render(t).encode()),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.floats()), max_size=4).map(
        lambda d: render(d).encode()),
    st.binary(max_size=80),
)

_DB = sqlite3.connect(":memory:")
_DB.execute("CREATE TABLE readings (topic TEXT, device TEXT, metric TEXT, value REAL, payload TEXT, wall REAL,"
            " boot_id TEXT, mono REAL)")


@given(TOPICS, READING_SHAPES)
def test_any_payload_parses_into_storable_readings_or_a_malformed_reading(topic: str, payload: bytes) -> None:
    try:
        readings = parse(topic, payload, now())
    except MalformedReading as exc:
        assert exc.reason
        return
    rows_ = [r.row() for r in readings]
    _DB.executemany("INSERT INTO readings VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows_)  # encodable, in range
    for r in readings:
        assert r.value is None or abs(r.value) < float("inf")
        if r.payload is not None:
            jsonsafe.loads(r.payload.encode(), jsonsafe.Limits(1 << 20))


@pytest.mark.parametrize("payload", [b'{"value": 1, "x": NaN}', b"9" * 309, b'{"\\ud800": 1}', b'{"value": 1e999}'])
def test_the_issue_payloads_are_malformed_readings(payload: bytes) -> None:
    with pytest.raises(MalformedReading):
        parse("factory/l/s" + ("" if payload.startswith(b'{"\\') else "/m"), payload, now())
