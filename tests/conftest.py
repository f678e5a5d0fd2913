"""Shared fixtures: a real Mosquitto per test, agent processes cleaned up by pid."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from agent.storage import Store
from agent_devkit.broker import Broker, running_broker

# Property tests: a few seconds each in the test command ("ci"); scripts/fuzz.sh runs them far longer
# ("long"). No deadline: a loaded CI machine must not turn a slow example into a failure; no example
# database: a clean clone behaves like any other run (failures print the seed to reproduce them).
settings.register_profile("ci", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    with running_broker(tmp_path / "mosquitto") as b:
        yield b


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """A real state database (WAL, single writer) in the test's tmp dir."""
    s = Store.open(tmp_path / "state")
    try:
        yield s
    finally:
        s.close()
