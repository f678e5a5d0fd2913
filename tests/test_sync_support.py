"""Helpers of the sync tests (no tests here): an uplink consumer that de-duplicates by key, a drain child process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from agent_devkit import REPO

DRAIN_CHILD = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from agent.storage import Store
    from agent.sync.drain import Drainer
    from agent.config.sync import OutboxSettings

    state, url, rate = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    settings = OutboxSettings(uplink_url=url, jitter_max_s=0.0, batch_records=50, inflight=8,
                              rate_limit_records_s=rate, reconnect_max_s=0.5, publish_timeout_s=5)
    store = Store.open(state)
    async def main() -> None:
        drainer = Drainer(store, settings, "gw-1")
        task = asyncio.create_task(drainer.run())
        while True:
            await asyncio.sleep(0.05)
            if drainer.sent_records:
                print("sending", flush=True)
                break
        await task
    asyncio.run(main())
""")


def start_drain_child(state: Path, url: str, rate: float) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", DRAIN_CHILD, str(state), url, str(rate)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()
