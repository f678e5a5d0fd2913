"""The supervisor in-process: watchdog pings only while services live; a failing heartbeat write
(e.g. a full disk) is reported but does not kill the daemon; a dead writer does."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.daemon.context import Context
from agent.daemon.heartbeat import started_job
from agent.daemon.notify import Notifier
from agent.daemon.supervisor import ServiceDied, Supervisor
from agent.errors import StorageError
from agent.storage import Store
from agent_devkit.procs import NotifySocket


def _watchdogs(sock: NotifySocket) -> int:
    sock.drain()
    return sum(1 for m in sock.messages if "WATCHDOG=1" in m.split("\n"))


async def _until(cond: Callable[[], bool], timeout: float = 30) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.fixture
def sock() -> Iterator[NotifySocket]:
    s = NotifySocket(Path(tempfile.mkdtemp(prefix="ea-")) / "n.sock")
    try:
        yield s
    finally:
        s.close()
        shutil.rmtree(s.path.parent, ignore_errors=True)


def test_supervisor_survives_failing_heartbeat_writes_but_not_a_dead_service(
        tmp_path: Path, sock: NotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    store = Store.open(tmp_path / "state")
    store.writer.run_sync(started_job(0.05))
    notifier = Notifier(str(sock.path))
    ctx = Context(config=AgentConfig(), config_path=None, store=store, notifier=notifier)

    async def scenario() -> None:
        service = asyncio.create_task(asyncio.sleep(3600), name="svc")
        sup = Supervisor(ctx, {"svc": service})
        task = asyncio.create_task(sup.run())
        try:
            await _until(lambda: _watchdogs(sock) >= 2)
            # the heartbeat write starts failing (a trigger stands in for a full disk)
            conn = sqlite3.connect(store.path)
            conn.execute("CREATE TRIGGER no_beat BEFORE UPDATE ON daemon "
                         "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END")
            conn.commit()
            await _until(lambda: "cannot write the state database" in ctx.status_text)
            beats = sup.beats
            pings = _watchdogs(sock)
            await _until(lambda: _watchdogs(sock) >= pings + 3)  # still pinging: the writer answers
            assert sup.beats == beats and not task.done()
            conn.execute("DROP TRIGGER no_beat")
            conn.commit()
            conn.close()
            await _until(lambda: sup.beats > beats)
            assert "cannot write" not in ctx.status_text
            # a service task that ends on its own stops the supervisor
            service.cancel()
            with pytest.raises(ServiceDied, match="svc"):
                await asyncio.wait_for(task, 30)
            pings = _watchdogs(sock)
            await asyncio.sleep(0.3)
            assert _watchdogs(sock) == pings
        finally:
            for t in (service, task):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t

    try:
        asyncio.run(scenario())
    finally:
        notifier.close()
        store.close()
        sock.close()


def test_supervisor_fails_when_the_writer_is_gone(tmp_path: Path, sock: NotifySocket) -> None:
    store = Store.open(tmp_path / "state")
    ctx = Context(config=AgentConfig(), config_path=None, store=store, notifier=Notifier(str(sock.path)))
    store.close()

    async def scenario() -> None:
        service = asyncio.create_task(asyncio.sleep(3600))
        try:
            with pytest.raises(StorageError, match="not running"):
                await asyncio.wait_for(Supervisor(ctx, {"svc": service}).run(), 30)
        finally:
            service.cancel()

    try:
        asyncio.run(scenario())
    finally:
        ctx.notifier.close()
        sock.close()


def test_a_notify_socket_nobody_drains_never_blocks_the_loop(sock: NotifySocket) -> None:
    """The datagram queue holds ~10 messages: routine pings beyond it are dropped, never waited for."""
    notifier = Notifier(str(sock.path))
    try:
        sent = [notifier.send("WATCHDOG=1") for _ in range(200)]  # would block at the 11th if it waited
        assert sent.count(True) >= 1 and notifier.dropped == sent.count(False) > 0
        sock.drain()
        assert notifier.send("READY=1", "STATUS=ok")
    finally:
        notifier.close()
