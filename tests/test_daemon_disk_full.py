"""A service that ends on a full disk is started again after a pause, never taking the daemon down
(systemd restarts a failed daemon only a few times, then leaves the gateway down)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from agent.daemon import main
from agent.daemon.context import Context, Service
from agent.errors import StorageError, StorageFull


class _Ctx:
    def __init__(self) -> None:
        self.status: dict[str, str] = {}

    def set_status(self, part: str, text: str) -> None:
        self.status[part] = text


class _Flaky:
    name = "flaky"

    def __init__(self, fail_times: int, error: Exception) -> None:
        self.fail_times, self.error, self.runs = fail_times, error, 0

    async def run(self) -> None:
        self.runs += 1
        if self.runs <= self.fail_times:
            raise self.error


def _run(svc: Any, ctx: _Ctx) -> None:
    asyncio.run(asyncio.wait_for(main.Daemon._run_service(cast(Context, ctx), cast(Service, svc)), 10))


def test_a_service_that_hits_a_full_disk_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "DISK_FULL_RETRY_S", 0.01)
    ctx, svc = _Ctx(), _Flaky(3, StorageFull("the disk is full"))
    _run(svc, ctx)
    assert svc.runs == 4 and ctx.status["flaky"] == "waiting: the state disk is full"


def test_other_failures_still_end_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "DISK_FULL_RETRY_S", 0.01)
    svc = _Flaky(1, StorageError("database is corrupt"))
    with pytest.raises(StorageError, match="corrupt"):
        _run(svc, _Ctx())
    assert svc.runs == 1
