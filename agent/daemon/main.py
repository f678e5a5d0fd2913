"""The daemon's life: config → lock → database → services → READY → … → STOPPING → exit.

Offline is the normal state: nothing here waits for a network. READY=1 is sent once the config
is valid, the database passed its integrity check and migrations, and every service task started.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

from agent import __version__, offload
from agent.config import AgentConfig, load_config
from agent.daemon.context import Context, Reloadable
from agent.daemon.heartbeat import started_job, stopped_job
from agent.daemon.lock import StateLock
from agent.daemon.notify import Notifier
from agent.daemon.services import build_services
from agent.daemon.supervisor import ServiceDied, Supervisor
from agent.errors import AgentError
from agent.logs import configure, get_logger
from agent.storage import Store

log = get_logger("daemon")


class Daemon:
    def __init__(self, config: AgentConfig, config_path: Path | None, state_dir_override: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir_override = state_dir_override
        self._stop = asyncio.Event()
        self._stop_reason = "stopped by signal"
        self._failure: BaseException | None = None

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()

    async def run(self) -> int:
        cfg = self.config
        lock = StateLock(cfg.state_dir)
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock.acquire()
        notifier = Notifier()
        try:
            store = Store.open(cfg.state_dir, synchronous=cfg.storage.synchronous,
                               batch_max=cfg.storage.commit_batch_max)
        except BaseException:
            lock.release()
            raise
        ctx = Context(config=cfg, config_path=self.config_path, store=store, notifier=notifier)
        try:
            return await self._serve(ctx)
        finally:
            offload.shutdown()
            store.close()
            notifier.close()
            lock.release()

    async def _serve(self, ctx: Context) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"stopped by {signal.Signals(sig).name}")
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload(ctx)))
        await ctx.store.writer.run(started_job(ctx.config.agent.heartbeat_interval_s))
        services = build_services(ctx)
        tasks = {svc.name: asyncio.create_task(svc.run(), name=svc.name) for svc in services}
        self._services = services
        supervisor = Supervisor(ctx, tasks)
        await asyncio.sleep(0)  # let every service start before declaring readiness
        supervisor.check_tasks()
        sup_task = asyncio.create_task(supervisor.run(), name="supervisor")
        ctx.notifier.ready(ctx.status_text)
        log.info("daemon_ready", version=__version__, node_id=ctx.config.node_id,
                 state_dir=str(ctx.config.state_dir), services=sorted(tasks))
        stop_task = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stop_task, sup_task}, return_when=asyncio.FIRST_COMPLETED)
        exit_code = 0
        if sup_task in done:
            exc = sup_task.exception()
            self._stop_reason = f"failed: {exc}"
            exit_code = 1
            log.error("daemon_failed", error=str(exc), error_type=type(exc).__name__)
            if isinstance(exc, AgentError | ServiceDied):
                await ctx.store.record_error("daemon", "service_died", str(exc))
        ctx.notifier.stopping()
        log.info("daemon_stopping", reason=self._stop_reason)
        for task in (stop_task, sup_task, *tasks.values()):
            task.cancel()
        pending = [t for t in tasks.values() if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=ctx.config.agent.stop_timeout_s)
            if still:
                log.error("daemon_stop_timeout", services=sorted(t.get_name() for t in still))
        with contextlib.suppress(asyncio.CancelledError):
            await sup_task
        await ctx.store.writer.run(stopped_job(self._stop_reason))
        log.info("daemon_stopped", reason=self._stop_reason, exit_code=exit_code)
        return exit_code

    async def reload(self, ctx: Context) -> None:
        """SIGHUP: re-read and validate the config; keep the old one if the new one is invalid."""
        ctx.notifier.reloading()
        try:
            new = load_config(self.config_path, self.state_dir_override)
        except AgentError as exc:
            log.error("config_reload_rejected", error=str(exc))
            await ctx.store.record_error("config", exc.code, str(exc))
            ctx.notifier.status(ctx.status_text)
            ctx.notifier.send("READY=1")
            return
        if new.state_dir != ctx.config.state_dir:
            log.warning("config_reload_state_dir_ignored", state_dir=str(new.state_dir))
            new = new.with_state_dir(ctx.config.state_dir)
        configure(new.agent.log_level, new.agent.log_format)
        ctx.config = new
        for svc in self._services:
            if hasattr(svc, "reload"):
                reloadable: Reloadable = svc  # type: ignore[assignment]
                await reloadable.reload(new)
        log.info("config_reloaded", path=str(self.config_path) if self.config_path else None)
        ctx.notifier.send("READY=1", f"STATUS={ctx.status_text}")


def run_daemon(config: AgentConfig, config_path: Path | None, state_dir_override: Path | None) -> int:
    configure(config.agent.log_level, config.agent.log_format)
    daemon = Daemon(config, config_path, state_dir_override)
    return asyncio.run(daemon.run())
