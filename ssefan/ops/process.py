"""The process around one App: signals, sd_notify, the admin listener, the end.

SIGHUP reloads the config, SIGTERM drains and stops, SIGINT does too and a
second SIGINT ends the drain at once. systemd (or a worker's supervisor) is
told READY, STATUS, WATCHDOG, RELOADING and STOPPING. `install_signal_handlers`
is how the supervisor (ops.supervisor) takes the same three signals.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ssefan.config import ConfigError, load_config
from ssefan.ops import logs
from ssefan.ops.admin import Admin
from ssefan.ops.drain import DRAIN_SHARE_OF_DEADLINE
from ssefan.ops.notify import Notifier, watchdog_interval
from ssefan.ops.worker import WorkerEnv

if TYPE_CHECKING:
    from ssefan.ops.app import App

__all__ = ["STATUS_INTERVAL", "Process", "install_signal_handlers"]

log = logging.getLogger("ssefan")

# STATUS= to systemd (and the supervisor) is refreshed this often.
STATUS_INTERVAL = 5.0


def install_signal_handlers(
    *,
    terminate: Callable[[], None],
    interrupt: Callable[[], None],
    reload: Callable[[], None],
) -> Callable[[], None]:
    """Handle SIGTERM, SIGINT and SIGHUP on the running loop; returns the
    function that removes the handlers again (the caller decides when: before
    its shutdown, or after it so that a second SIGINT still hurries it)."""
    loop = asyncio.get_running_loop()
    handlers = {signal.SIGTERM: terminate, signal.SIGINT: interrupt, signal.SIGHUP: reload}
    for sig, handler in handlers.items():
        loop.add_signal_handler(sig, handler)

    def remove() -> None:
        for sig in handlers:
            loop.remove_signal_handler(sig)

    return remove


class Process:
    """The process around one App: signals, sd_notify, the admin listener,
    reload and the drain at the end."""

    def __init__(self, app: App, worker: WorkerEnv | None) -> None:
        self.app = app
        self.worker = worker
        self.notifier = Notifier.from_env()
        self.admin: Admin | None = None
        self.stopping = asyncio.Event()  # TERM/INT (or the supervisor gone)
        self.hurry = asyncio.Event()  # a second SIGINT: end the drain at once
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ready: asyncio.Task[None] | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self._start_admin()
        remove_signal_handlers = install_signal_handlers(
            terminate=self._terminate, interrupt=self._interrupt, reload=self._reload
        )
        if self.worker is not None:
            # ssefan's own field, for the supervisor only: it logs the
            # "listening on" line once every worker accepts, and from now on
            # this worker handles SIGHUP (before, it would have killed it).
            self.notifier.send(LISTENING=1)
            loop.add_reader(self.worker.parent_fd, self._supervisor_gone)
        interval = watchdog_interval()
        if interval is not None:
            self.notifier.watchdog()
            self._every("watchdog", interval, self.notifier.watchdog)
        self._every("status", STATUS_INTERVAL, lambda: self.notifier.status(self.app.status_line()))
        self._ready = loop.create_task(self._announce_ready(), name="ready")
        try:
            await self.stopping.wait()
        finally:
            if self.worker is not None:
                loop.remove_reader(self.worker.parent_fd)
            self._ready.cancel()
            await self._shutdown()  # signals still handled: a second SIGINT hurries it
            remove_signal_handlers()
            for timer in self._timers.values():
                timer.cancel()
            self.notifier.close()
        return 0

    def _every(self, name: str, interval: float, tick: Callable[[], object]) -> None:
        """Call `tick` every `interval` seconds from the event loop itself (a
        timer, not a thread): a stuck loop stops the watchdog pings, which is
        the point of them."""
        loop = asyncio.get_running_loop()

        def fire() -> None:
            tick()
            self._timers[name] = loop.call_later(interval, fire)

        self._timers[name] = loop.call_later(interval, fire)

    async def _start_admin(self) -> None:
        if self.worker is not None:
            sock = self.worker.admin_listener()
            if sock is not None:
                self.admin = Admin(self.app)
                await self.admin.start_unix(sock)
        elif self.app.config.admin is not None:
            self.admin = Admin(self.app)
            listen = self.app.config.admin.listen
            await self.admin.start_tcp(listen.host, listen.port)

    async def _announce_ready(self) -> None:
        timeout = self.app.config.ready_timeout
        if not await self.app.wait_ready(timeout):
            why = "; ".join(self.app.readiness())
            if self.notifier.enabled and self.worker is None:
                log.warning(
                    "not ready after %gs (%s): reporting ready anyway so the service starts",
                    timeout,
                    why,
                )
            else:
                # Without systemd nobody waits for READY=1; a worker's supervisor
                # says it for all of them. The upstream failures are logged already.
                log.debug("not ready after %gs (%s)", timeout, why)
        self.notifier.ready(self.app.status_line())

    # -- signals --------------------------------------------------------------------

    def _terminate(self) -> None:
        if not self.stopping.is_set():
            log.info("SIGTERM: shutting down")
            self.stopping.set()

    def _interrupt(self) -> None:
        if self.stopping.is_set():
            log.info("second SIGINT: ending the drain now")
            self.hurry.set()
        else:
            log.info("SIGINT: shutting down (again to skip the drain)")
            self.stopping.set()

    def _supervisor_gone(self) -> None:
        assert self.worker is not None
        asyncio.get_running_loop().remove_reader(self.worker.parent_fd)
        if not self.stopping.is_set():
            log.warning("the supervisor is gone: shutting down")
            self.stopping.set()

    def _reload(self) -> None:
        if self.stopping.is_set():
            return
        self.notifier.reloading()
        source = self.app.config.source
        try:
            if self.worker is not None:
                new = self.worker.load_config(source)
            else:
                new = load_config(source)
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload: %s", problem)
            log.error(
                "reload failed with %d problem(s): still running the previous config",
                len(err.problems),
            )
            self.app.reloads["failed"] += 1
        else:
            logs.remember_secrets(new)
            change = self.app.reload(new)
            self.app.reloads["ok"] += 1
            log.info("reloaded %s: %s", source, change.summary())
        self.notifier.ready(self.app.status_line())

    # -- shutdown -------------------------------------------------------------------

    async def _shutdown(self) -> None:
        config = self.app.config
        self.notifier.stopping()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.shutdown_timeout
        window = min(config.drain_window, config.shutdown_timeout * DRAIN_SHARE_OF_DEADLINE)
        try:
            async with asyncio.timeout_at(deadline):
                await self.app.drain(window, self.hurry)
        except TimeoutError:
            log.warning("shutdown_timeout (%gs) passed during the drain", config.shutdown_timeout)
        if self.admin is not None:
            await self.admin.stop()
        await self.app.stop(grace=max(0.0, deadline - loop.time()))
