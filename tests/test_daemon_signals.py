"""SIGHUP reload (valid and invalid), SIGINT, two daemons on one state dir, a dying service."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent_devkit import REPO
from agent_devkit.procs import NotifySocket, agent_process, run_agent, status_json


def _config(path: Path, state: Path, level: str = "info", heartbeat: float = 0.5) -> Path:
    path.write_text(f"[agent]\nstate_dir = '{state}'\nlog_level = '{level}'\nheartbeat_interval_s = {heartbeat}\n")
    return path


def _count(messages: list[str], field: str) -> int:
    return sum(1 for m in messages if field in m.split("\n"))


def _wait_for_count(agent_notify: NotifySocket, field: str, n: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _count(agent_notify.messages, field) < n:
        assert time.monotonic() < deadline, f"fewer than {n} {field}: {agent_notify.messages}"
        with contextlib.suppress(AssertionError):
            agent_notify.wait_for("__never__", timeout=0.2)


def test_sighup_reloads_a_valid_config_and_rejects_an_invalid_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = _config(tmp_path / "agent.toml", state)
    with agent_process(state, config) as agent:
        agent.wait_ready()
        # valid: debug logging takes effect without a restart
        _config(config, state, level="debug")
        agent.signal(signal.SIGHUP)
        _wait_for_count(agent.notify, "READY=1", 2)
        assert _count(agent.notify.messages, "RELOADING=1") == 1
        reloading = next(m for m in agent.notify.messages if "RELOADING=1" in m.split("\n"))
        assert any(f.startswith("MONOTONIC_USEC=") for f in reloading.split("\n"))
        assert "config_reloaded" in agent.output()

        # invalid: rejected, the old config stays, the daemon keeps running, status shows why
        config.write_text("[agent]\nlog_level = 'chatty'\n")
        agent.signal(signal.SIGHUP)
        _wait_for_count(agent.notify, "READY=1", 3)
        assert "config_reload_rejected" in agent.output()
        assert agent.proc.poll() is None
        code, report = status_json(state, config=_config(tmp_path / "status.toml", state))
        assert code == 0, report
        assert report["daemon"]["state"] == "running"  # type: ignore[index]
        rejected = [e for e in report["errors"] if e["code"] == "config_reload_rejected"]  # type: ignore[attr-defined]
        assert rejected and "agent.log_level" in rejected[0]["message"] and str(config) in rejected[0]["message"]

        # and it still stops cleanly on SIGINT
        agent.signal(signal.SIGINT)
        assert agent.proc.wait(30) == 0
    assert "stopped by SIGINT" in status_json(state)[1]["daemon"]["status_text"]  # type: ignore[index]


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_process(state) as first:
        first.wait_ready()
        second = run_agent("run", "--state-dir", str(state), timeout=60)
        assert second.returncode == 1
        assert "already runs with state dir" in second.stderr
        assert first.proc.poll() is None
        assert status_json(state)[1]["daemon"]["pid"] == first.pid  # type: ignore[index]
        assert first.stop() == 0


DYING_SERVICE = textwrap.dedent("""
    import asyncio, dataclasses, os, sys
    from pathlib import Path
    import agent.daemon.main as m
    from agent.errors import StorageError

    class Dying:
        name = "dying"
        async def run(self):
            trigger = Path(os.environ["DIE_TRIGGER"])
            while not trigger.exists():
                await asyncio.sleep(0.05)
            if trigger.read_text() == "storage":
                raise StorageError("database disk image is malformed")
            raise RuntimeError("sensor bus exploded")

    original = m.build

    def build(ctx):
        built = original(ctx)
        return dataclasses.replace(built, services=(*built.services, Dying()))

    m.build = build
    from agent.cli.agent_main import main
    raise SystemExit(main(sys.argv[1:]))
""")


@contextlib.contextmanager
def dying_daemon(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], NotifySocket, Path]]:
    state = tmp_path / "state"
    sock = NotifySocket(Path(tempfile.mkdtemp(prefix="ea-")) / "n.sock")  # short path: sun_path is 108 bytes
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", DYING_SERVICE, "run", "--state-dir", str(state)], cwd=REPO,
                            env={"NOTIFY_SOCKET": str(sock.path), "WATCHDOG_USEC": "400000",
                                 "DIE_TRIGGER": str(tmp_path / "die-now"), "PATH": "/usr/bin:/bin"},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        sock.wait_for("READY=1")
        sock.wait_for("WATCHDOG=1")
        yield proc, sock, state
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        sock.close()
        shutil.rmtree(sock.path.parent, ignore_errors=True)


def _pings(sock: NotifySocket) -> int:
    return sum(m.split("\n").count("WATCHDOG=1") for m in sock.messages)


def _services(state: Path) -> dict[str, Any]:
    report: Any = status_json(state)[1]
    return dict(report["daemon"].get("services", {}))


def test_a_failing_service_is_restarted_in_place_and_reported(tmp_path: Path) -> None:
    """The daemon keeps running (and pinging the watchdog) while a service fails and restarts: a new
    process would meet the same failure, and systemd gives up on a unit after a few."""
    with dying_daemon(tmp_path) as (proc, sock, state):
        (tmp_path / "die-now").write_text("bug")
        deadline = time.monotonic() + 30
        while True:
            sock.drain()  # as systemd does: a full notify socket would block the daemon's sendto
            code, report = status_json(state)
            problems: Any = report["problems"]
            if any("service 'dying' failed and was restarted" in p for p in problems):
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.2)
        assert code == 1 and proc.poll() is None
        dying = _services(state)["dying"]
        assert dying["restarts"] >= 1 and "sensor bus exploded" in dying["last_error"]
        errors: Any = report["errors"]
        assert any(e["code"] == "service_restarted" for e in errors)
        (tmp_path / "die-now").unlink()  # whatever made it fail is gone: the next restart sticks
        pings = _pings(sock)
        deadline = time.monotonic() + 30
        while _pings(sock) < pings + 3:  # the watchdog is still fed all along
            assert time.monotonic() < deadline
            time.sleep(0.1)
            sock.drain()
        deadline = time.monotonic() + 90  # the backoff may have grown meanwhile (60 s at most)
        while _services(state)["dying"]["state"] != "running":
            assert time.monotonic() < deadline
            sock.drain()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "service_failed" in (tmp_path / "agent.log").read_text()


def test_a_failing_database_stops_the_watchdog_and_exits_non_zero(tmp_path: Path) -> None:
    """What a new process fixes (it checks the database and sets a corrupt one aside) ends this one."""
    with dying_daemon(tmp_path) as (proc, sock, state):
        (tmp_path / "die-now").write_text("storage")
        code = proc.wait(60)
        sock.drain()
    output = (tmp_path / "agent.log").read_text()
    assert code == 1, output
    fields = [f for m in sock.messages for f in m.split("\n")]
    assert "STOPPING=1" in fields
    assert "WATCHDOG=1" not in fields[fields.index("STOPPING=1"):]
    assert "daemon_failed" in output and "database disk image is malformed" in output
    status, report = status_json(state)
    assert status == 1
    assert report["daemon"]["state"] == "failed"  # type: ignore[index]
    errors: Any = report["errors"]
    assert any(e["code"] == "service_died" and "malformed" in e["message"] for e in errors)


STUBBORN_SERVICE = textwrap.dedent("""
    import asyncio, dataclasses, sys
    import agent.daemon.main as m

    class Stubborn:
        name = "stubborn"
        async def run(self):
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    continue  # a bug: ignores cancellation

    original = m.build

    def build(ctx):
        built = original(ctx)
        return dataclasses.replace(built, services=(*built.services, Stubborn()))

    m.build = build
    from agent.cli.agent_main import main
    raise SystemExit(main(sys.argv[1:]))
""")


def test_a_service_that_ignores_cancellation_cannot_hang_the_stop(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = tmp_path / "agent.toml"
    config.write_text("[agent]\nstop_timeout_s = 0.5\n")
    sock = NotifySocket(Path(tempfile.mkdtemp(prefix="ea-")) / "n.sock")
    log = (tmp_path / "agent.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN_SERVICE, "run", "--state-dir", str(state),
                             "--config", str(config)], cwd=REPO,
                            env={"NOTIFY_SOCKET": str(sock.path), "PATH": "/usr/bin:/bin"},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        sock.wait_for("READY=1")
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()
        sock.close()
        shutil.rmtree(sock.path.parent, ignore_errors=True)
    output = (tmp_path / "agent.log").read_text()
    assert code == 1, output
    assert "daemon_stop_timeout" in output and "stubborn" in output
    assert status_json(state)[1]["daemon"]["state"] == "stopped"  # type: ignore[index]
