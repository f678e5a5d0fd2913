"""The daemon's life: config → lock → database → services → READY → … → STOPPING → exit.

Offline is the normal state: nothing here waits for a network. READY=1 is sent once the config
is valid, the database passed its integrity check and migrations, and every service task started.
Exit codes: 0 after a requested stop, 1 when the storage failed (systemd restarts it; a failing service
is restarted in place instead, see ``_run_service``), 2 for a config error (raised before this module
runs; see ``agent.cli.run_cmd``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path

from agent import __version__, offload
from agent.config import AgentConfig, load_config
from agent.daemon.context import Context, Reloadable, Service
from agent.daemon.heartbeat import started_job, stopped_job
from agent.daemon.notify import Notifier
from agent.daemon.supervisor import (
    RESTART_MAX_S,
    RESTART_MIN_S,
    STABLE_RUN_S,
    ServiceDied,
    ServiceHealth,
    Supervisor,
)
from agent.daemon.wiring import build
from agent.errors import AgentError, StorageError, StorageFull
from agent.logs import configure, get_logger
from agent.messaging.backoff import Backoff
from agent.storage import Store
from agent.storage.lock import StateLock

log = get_logger("daemon")

EXIT_OK = 0
EXIT_FAILED = 1
DISK_FULL_RETRY_S = 2.0
DISK_FULL_RETRY_MAX_S = 60.0


class Daemon:
    def __init__(self, config: AgentConfig, config_path: Path | None, state_dir_override: Path | None) -> None:
        self.config = config
        self.config_path = config_path
        self.state_dir_override = state_dir_override
        self._stop = asyncio.Event()
        self._stop_reason = "stopped by signal"
        self._services: tuple[Service, ...] = ()
        self._reloadables: tuple[Reloadable, ...] = ()
        self._ctx: Context | None = None
        self._reload_lock = asyncio.Lock()
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self._reload_pending = False
        self.reloads = 0

    def request_stop(self, reason: str) -> None:
        self._stop_reason = reason
        self._stop.set()

    def _on_sighup(self) -> None:
        if self._ctx is None:
            if not self._stop.is_set():  # still starting: reload right after READY
                self._reload_pending = True
                log.info("config_reload_deferred", reason="daemon still starting")
            return
        task = asyncio.get_running_loop().create_task(self.reload(self._ctx), name="reload")
        self._reload_tasks.add(task)  # keep a reference until it is done
        task.add_done_callback(self._reload_tasks.discard)

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        # signals first: a SIGTERM during a long integrity check stops us cleanly right after it
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, f"stopped by {signal.Signals(sig).name}")
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        notifier = Notifier()
        cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        lock = StateLock(cfg.state_dir)
        lock.acquire()
        try:
            notifier.status("checking and migrating the state database")
            store = Store.open(cfg.state_dir, synchronous=cfg.storage.synchronous,
                               batch_max=cfg.storage.commit_batch_max, owner=True)
        except BaseException:
            lock.release()
            notifier.close()
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
        try:
            ctx.previous_end = await ctx.store.writer.run(started_job(ctx.config.agent.heartbeat_interval_s))
        except StorageFull as exc:
            # start anyway: the broker keeps what cannot be stored, and once space is freed everything
            # resumes by itself; dying here would only let the service manager give up on us
            log.error("daemon_start_not_recorded", error=str(exc), code=exc.code)
        if ctx.store.corrupt is not None:
            log.error("database_was_corrupt", error=str(ctx.store.corrupt))
        if self._stop.is_set():  # SIGTERM while the database was being checked: don't start anything
            return await self._shutdown(ctx, {}, None, None)
        ctx.notifier.status("starting services")
        try:
            components = build(ctx)
        except Exception as exc:  # a service that cannot even be built: record it, stop as failed
            return await self._shutdown(ctx, {}, None, exc)
        services = components.services
        self._services, self._reloadables = services, components.reloadables
        health = ServiceHealth(ctx, [svc.name for svc in services])
        await health.started()
        tasks = {svc.name: asyncio.create_task(self._run_service(ctx, svc, health), name=svc.name)
                 for svc in services}
        supervisor = Supervisor(ctx, tasks)
        await asyncio.sleep(0)  # let every service start before declaring readiness
        try:
            supervisor.check_tasks()
        except ServiceDied as exc:
            return await self._shutdown(ctx, tasks, None, exc)
        sup_task = asyncio.create_task(supervisor.run(), name="supervisor")
        self._ctx = ctx
        ctx.notifier.ready(ctx.status_text)
        log.info("daemon_ready", version=__version__, node_id=ctx.config.node_id,
                 state_dir=str(ctx.config.state_dir), services=sorted(tasks),
                 watchdog_s=supervisor.watchdog_s)
        if self._reload_pending:
            self._reload_pending = False
            self._on_sighup()
        stop_task = asyncio.create_task(self._stop.wait(), name="stop-request")
        # wake at once when a service task ends on its own, not only at the next heartbeat
        done, _ = await asyncio.wait({stop_task, sup_task, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        failure: BaseException | None = None
        if stop_task not in done or not self._stop.is_set():
            try:
                supervisor.check_tasks()
                if sup_task.done():
                    failure = sup_task.exception() or ServiceDied("the supervisor ended unexpectedly")
            except ServiceDied as exc:
                failure = exc
        return await self._shutdown(ctx, tasks, sup_task, failure)

    @staticmethod
    async def _run_service(ctx: Context, svc: Service, health: ServiceHealth) -> None:
        """Run a service for the daemon's life. If it fails (or returns), it is restarted after the backoff
        and ``status`` reports it: restarting the process would not help (whatever made it fail, a retained
        message say, comes back after every start) and a daemon that keeps failing is left down by
        systemd. Only a failing storage ends the task (and the daemon: a new process checks and reopens
        the database). On a full disk the service waits for space, which is not a failure."""
        disk_pause = DISK_FULL_RETRY_S
        backoff = Backoff(RESTART_MIN_S, RESTART_MAX_S)
        while True:
            started = time.monotonic()
            try:
                await svc.run()
                failure: BaseException = ServiceDied(f"service '{svc.name}' stopped although nobody asked it to")
            except StorageFull as exc:
                log.error("service_waiting_for_disk", service=svc.name, error=str(exc), retry_in_s=disk_pause)
                ctx.set_status(svc.name, "waiting: the state disk is full")
                await asyncio.sleep(disk_pause)
                disk_pause = min(DISK_FULL_RETRY_MAX_S, disk_pause * 2)
                continue
            except StorageError:
                raise  # a failing database: a new process checks it (and sets a corrupt one aside)
            except Exception as exc:
                failure = exc
            if not ctx.store.writer.alive:
                raise failure
            if time.monotonic() - started >= STABLE_RUN_S:
                backoff.reset()
            delay = backoff.next()
            await health.failed(svc.name, failure, delay)
            await asyncio.sleep(delay)
            await health.restarted(svc.name)

    async def _shutdown(self, ctx: Context, tasks: dict[str, asyncio.Task[None]],
                        sup_task: asyncio.Task[None] | None, failure: BaseException | None) -> int:
        self._ctx = None  # no reloads while stopping
        exit_code = EXIT_OK
        if failure is not None:
            self._stop_reason = f"failed: {failure}"
            exit_code = EXIT_FAILED
            log.error("daemon_failed", error=str(failure), error_type=type(failure).__name__)
            code = failure.code if isinstance(failure, AgentError) else "service_died"
            await self._record_error(ctx, "daemon", code, str(failure))
        ctx.notifier.stopping()
        ctx.notifier.status(f"stopping: {self._stop_reason}")
        log.info("daemon_stopping", reason=self._stop_reason)
        others = [*self._reload_tasks, *([sup_task] if sup_task else [])]
        for task in (*others, *tasks.values()):
            task.cancel()
        pending = [t for t in (*tasks.values(), *others) if not t.done()]
        if pending:
            _, still = await asyncio.wait(pending, timeout=ctx.config.agent.stop_timeout_s)
            if still:
                log.error("daemon_stop_timeout", tasks=sorted(t.get_name() for t in still),
                          timeout_s=ctx.config.agent.stop_timeout_s)
                exit_code = EXIT_FAILED
        for task in others:
            if task.done() and not task.cancelled() and task.exception() is not None and failure is None:
                log.error("task_failed_while_stopping", task=task.get_name(), error=str(task.exception()))
        try:
            await ctx.store.writer.run(stopped_job(self._stop_reason, "stopped" if failure is None else "failed"))
        except AgentError as exc:
            log.error("daemon_stop_not_recorded", error=str(exc))
            exit_code = EXIT_FAILED
        log.info("daemon_stopped", reason=self._stop_reason, exit_code=exit_code)
        return exit_code

    async def _record_error(self, ctx: Context, component: str, code: str, message: str) -> None:
        """Best effort: the error may be the storage itself."""
        try:
            await ctx.store.record_error(component, code, message)
        except AgentError as exc:
            log.error("error_not_recorded", error=str(exc), original_code=code)

    async def reload(self, ctx: Context) -> None:
        """SIGHUP: re-read and validate the config; keep the old one if the new one is invalid."""
        async with self._reload_lock:
            ctx.notifier.reloading()
            try:
                new = load_config(self.config_path, self.state_dir_override)
            except AgentError as exc:
                log.error("config_reload_rejected", error=str(exc), code=exc.code)
                await self._record_error(ctx, "config", "config_reload_rejected", str(exc))
                ctx.notifier.send("READY=1", f"STATUS={ctx.status_text} (config reload rejected: kept the old one)")
                return
            if new.state_dir != ctx.config.state_dir:
                log.warning("config_reload_state_dir_ignored", state_dir=str(new.state_dir),
                            kept=str(ctx.config.state_dir))
                new = new.with_state_dir(ctx.config.state_dir)
            configure(new.agent.log_level, new.agent.log_format)
            ctx.config = new
            failed: list[str] = []
            for svc in self._reloadables:
                try:
                    await svc.reload(new)
                except Exception as exc:  # one service's reload must not take the others down
                    failed.append(svc.name)
                    log.error("service_reload_failed", service=svc.name, error=str(exc))
                    await self._record_error(ctx, svc.name, "reload_failed", str(exc))
            self.reloads += 1
            log.info("config_reloaded", path=str(self.config_path) if self.config_path else None,
                     failed_services=failed)
            ctx.notifier.send("READY=1", f"STATUS={ctx.status_text}")


def run_daemon(config: AgentConfig, config_path: Path | None, state_dir_override: Path | None) -> int:
    configure(config.agent.log_level, config.agent.log_format)
    daemon = Daemon(config, config_path, state_dir_override)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(daemon.run())
    finally:
        _close_loop(loop, config.agent.stop_timeout_s)


def _close_loop(loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
    """Like ``asyncio.run``'s clean-up, but bounded: a task that ignores cancellation cannot hang exit."""
    try:
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in left:
            task.cancel()
        if left:
            started = time.monotonic()
            _, still = loop.run_until_complete(asyncio.wait(left, timeout=timeout_s))
            if still:
                log.error("tasks_abandoned_at_exit", tasks=sorted(t.get_name() for t in still),
                          waited_s=round(time.monotonic() - started, 1))
        with contextlib.suppress(Exception):
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), timeout_s))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
