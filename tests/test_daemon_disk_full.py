"""A service that ends on a full disk is started again after a pause, never taking the daemon down
(systemd restarts a failed daemon only a few times, then leaves the gateway down)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

import pytest

from agent.daemon import main
from agent.daemon.context import Context, Service
from agent.daemon.supervisor import ServiceHealth
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
        await asyncio.Event().wait()  # then it runs, as a service does, until it is cancelled


class _Health:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.restarts = 0

    async def failed(self, name: str, exc: BaseException, retry_in_s: float) -> None:
        self.failures.append(f"{name}: {type(exc).__name__}: {exc}")

    async def restarted(self, name: str) -> None:
        self.restarts += 1


def _run(svc: _Flaky, ctx: _Ctx, health: _Health | None = None) -> None:
    """Run the service until it settles (runs for good) or its task ends; raise what ended it."""
    async def go() -> None:
        task = asyncio.create_task(main.Daemon._run_service(cast(Context, ctx), cast(Service, svc),
                                                            cast(ServiceHealth, health or _Health())))
        async with asyncio.timeout(10):
            while svc.runs <= svc.fail_times and not task.done():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        if task.done():
            task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    asyncio.run(go())


def test_a_service_that_hits_a_full_disk_is_started_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "DISK_FULL_RETRY_S", 0.01)
    ctx, svc, health = _Ctx(), _Flaky(3, StorageFull("the disk is full")), _Health()
    _run(svc, ctx, health)
    assert svc.runs == 4 and ctx.status["flaky"] == "waiting: the state disk is full"
    assert health.failures == []  # waiting for space is not a failure


def test_a_failing_storage_still_ends_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process checks the database (and sets a corrupt one aside): that is what fixes this."""
    monkeypatch.setattr(main, "DISK_FULL_RETRY_S", 0.01)
    svc = _Flaky(1, StorageError("database is corrupt"))
    with pytest.raises(StorageError, match="corrupt"):
        _run(svc, _Ctx())
    assert svc.runs == 1


def test_any_other_failure_restarts_the_service_with_the_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "RESTART_MIN_S", 0.01)
    ctx, health = _Ctx(), _Health()
    ctx.store = SimpleNamespace(writer=SimpleNamespace(alive=True))  # type: ignore[attr-defined]
    svc = _Flaky(3, RuntimeError("a bug"))
    _run(svc, ctx, health)
    assert svc.runs == 4 and health.restarts == 3
    assert health.failures == ["flaky: RuntimeError: a bug"] * 3
