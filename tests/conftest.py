"""Shared fixtures: a real Mosquitto per test, agent processes cleaned up by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.storage import Store
from agent_devkit.broker import Broker, running_broker


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
