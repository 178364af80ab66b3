"""`workers: N`: N processes on one port, supervised the way systemd supervises one.

Each worker is an ordinary `ssefan serve` (one event loop, its own upstream
subscription per route) started with the variables described in worker.py.

* One port. Without socket activation the supervisor binds a SO_REUSEPORT
  socket and does not listen on it: that fixes the port (port 0 becomes a real
  one) and keeps it reserved while workers restart; each worker binds and
  listens on its own SO_REUSEPORT socket, and the kernel spreads connections
  over their accept queues. With socket activation every worker shares the
  socket systemd passed (one accept queue; systemd keeps it open over restarts).
* The supervisor is to its workers what systemd is to it. Workers send
  sd_notify messages to the supervisor's datagram socket (READY, STATUS,
  WATCHDOG, RELOADING, STOPPING, and ssefan's own LISTENING), identified by
  the sender's pid (SCM_CREDENTIALS); datagrams from another uid, or from a
  process that is neither a worker nor a child of ours, are dropped. A worker
  that dies is restarted (with backoff if it keeps dying, or if starting it
  fails); one whose loop stops pinging is killed and restarted, as systemd's
  watchdog would do to a single process. The
  supervisor reports READY=1 to systemd once every worker is ready.
* Signals: HUP validates the file once, then hands the new text to every
  worker (through a memfd) and passes HUP on; TERM passes TERM on and each
  worker drains its own streams; a second INT passes INT on (drain skipped).
* Metrics: the supervisor's admin listener collects each worker's families
  from a private Unix socket and labels them `worker="N"`, per worker rather
  than summed (see metrics.merge for why).

Linux only (SO_REUSEPORT balancing, memfd, SCM_CREDENTIALS), like systemd.

Past 400 lines, knowingly: one process's supervision (spawn, reap, watchdog,
notify, signals, reload, shutdown) over one shared list of workers. The
metrics scrape is the HTTP client's (http/client.py); cutting the rest (the
notify receiver first) is its own step of issue 11.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path

import h11

from ssefan.config import Config, ConfigError, parse_config
from ssefan.http.client import OriginProtocolError, connect_unix, fetch
from ssefan.ops import logs, metrics, sockets
from ssefan.ops import reload as reloading
from ssefan.ops.admin import Admin
from ssefan.ops.notify import Notifier, watchdog_interval
from ssefan.ops.process import install_signal_handlers
from ssefan.ops.worker import (
    ALL_VARIABLES,
    ENV_ADMIN_SOCKET,
    ENV_CONFIG_FD,
    ENV_LISTEN_FD,
    ENV_PARENT_FD,
    ENV_REUSEPORT,
    ENV_WORKER,
    encode_config,
    unix_address,
)
from ssefan.stream.state import StateDir

__all__ = ["Supervisor", "supervise"]

log = logging.getLogger("ssefan.supervisor")

# A worker whose event loop has not pinged for this long is killed and
# restarted. 10 s: a loop stuck that long has already missed a heartbeat
# (15 s by default) for most of its clients; systemd's WatchdogSec for the
# supervisor itself is longer.
WORKER_WATCHDOG = 10.0
# Restart backoff for a worker that keeps dying: doubling from the first to
# the last value; a worker that lived STABLE_AFTER seconds starts over. A
# crash loop then costs a restart every 30 s, not a busy loop.
RESTART_DELAY = (0.5, 30.0)
STABLE_AFTER = 60.0
# Time a worker gets to exit after TERM beyond shutdown_timeout (which each
# worker enforces itself) before it is killed.
KILL_GRACE = 2.0
# The supervisor asks each worker for its metrics with this deadline: a
# stuck worker must not stall the scrape of the others.
SCRAPE_TIMEOUT = 2.0
# Messages kept per worker that spoke before create_subprocess_exec returned
# its pid to us: in those milliseconds a worker sends one or two (LISTENING=1
# and a first WATCHDOG=1); more than this is not a worker starting.
EARLY_MESSAGES_KEPT = 16
# systemd's own limit for one notify datagram (NOTIFY_BUFFER_MAX).
NOTIFY_MAX_DATAGRAM = 4096
# Variables of our own environment a worker must not see (they are for us).
_PRIVATE = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", *ALL_VARIABLES)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(slots=True)
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    listening: bool = False
    ready: bool = False
    status: str = ""
    last_ping: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0  # deaths in a row, each before STABLE_AFTER

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.returncode is None else None


class Supervisor:
    def __init__(self, config: Config, text: str, log_args: list[str]) -> None:
        self.config = config
        self.log_args = log_args
        self.notifier = Notifier.from_env()
        self.workers = [_Worker(i) for i in range(config.workers)]
        self.admin: Admin | None = None
        self.stopping = asyncio.Event()
        self.reloads = {"ok": 0, "failed": 0}
        self._changed = asyncio.Event()  # any worker message or exit
        self._token = f"ssefan-{os.getpid()}-{secrets.token_hex(4)}"
        self._config_fd = os.memfd_create("ssefan-config")
        self._write_config(text)
        self._parent_read, self._parent_write = os.pipe()
        self._listener: socket.socket | None = None  # shared (socket activation)
        self._reserved: socket.socket | None = None  # SO_REUSEPORT port holder
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        self._notify.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._notify.bind(unix_address(f"@{self._token}/notify"))
        self._tasks: set[asyncio.Task[None]] = set()
        # Messages from a child of ours whose pid we don't know yet: a worker
        # may speak before create_subprocess_exec has returned its pid to us.
        self._early: dict[int, list[str]] = {}
        self._uid = os.getuid()
        self._strangers = 0  # datagrams dropped: not from one of our workers
        self._hurried = False

    # -- the whole run ----------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self.config.state_dir is not None:
            # Checked before any worker exists: an unusable directory is one
            # line and exit 2 here, not N workers failing and restarting.
            try:
                StateDir(Path(self.config.state_dir))
            except BaseException:
                self._close()
                raise
        self._listener = sockets.systemd_listener()
        if self._listener is None:
            listen = self.config.listen
            self._reserved = sockets.reserve_port(listen.host, listen.port)
        if self.config.admin is not None:
            # Bound before any worker exists, like the port: an address in use
            # is then a one-line error and exit 2, not a task's lost exception.
            self.admin = Admin(self)
            admin_listen = self.config.admin.listen
            try:
                await self.admin.start_tcp(admin_listen.host, admin_listen.port)
            except BaseException:
                self._close()
                raise
        loop.add_reader(self._notify.fileno(), self._on_notify)
        remove_signal_handlers = install_signal_handlers(
            terminate=self._terminate, interrupt=self._interrupt, reload=self._reload
        )
        for worker in self.workers:
            await self._spawn(worker)
        self._spawn_task(self._start_up())
        self._spawn_task(self._watch())
        try:
            await self.stopping.wait()
        finally:
            remove_signal_handlers()
            await self._shutdown()
            loop.remove_reader(self._notify.fileno())
            self._close()
        return 0

    async def _start_up(self) -> None:
        """Log the listening line once workers accept; READY=1 once they are ready."""
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.config.ready_timeout
        await self._until(
            lambda: (
                all(w.listening for w in self.workers)
                or (loop.time() > limit and any(w.listening for w in self.workers))
            ),
            tick=0.1,
        )
        routes = ", ".join(f"{r.path} <- {r.upstream.url}" for r in self.config.routes)
        log.info(
            "ssefan listening on %s (workers: %d, routes: %s)",
            self.url,
            len(self.workers),
            routes or "none",
        )
        await self._announce_ready()

    async def _announce_ready(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.ready_timeout):
                await self._until(lambda: not self.readiness())
        if self.readiness():
            why = "; ".join(self.readiness())
            if self.notifier.enabled:
                log.warning(
                    "not ready after %gs (%s): reporting ready anyway so the service starts",
                    self.config.ready_timeout,
                    why,
                )
            else:  # not under systemd: nobody waits for READY=1
                log.debug("not ready after %gs (%s)", self.config.ready_timeout, why)
        self.notifier.ready(self.status_line())

    async def _until(self, condition: Callable[[], bool], tick: float | None = None) -> None:
        while not condition():
            self._changed.clear()
            if tick is None:
                await self._changed.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(tick):
                        await self._changed.wait()

    @property
    def url(self) -> str:
        sock = self._listener or self._reserved
        assert sock is not None
        host, port = sock.getsockname()[:2]
        return sockets.http_url(str(host), port, tls=self.config.listen.tls is not None)

    def _spawn_task(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- workers ----------------------------------------------------------------------

    async def _spawn(self, worker: _Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k not in _PRIVATE}
        env.update(
            {
                ENV_WORKER: str(worker.index),
                ENV_CONFIG_FD: str(self._config_fd),
                ENV_PARENT_FD: str(self._parent_read),
                "NOTIFY_SOCKET": f"@{self._token}/notify",
                "WATCHDOG_USEC": str(int(WORKER_WATCHDOG * 1_000_000)),
            }
        )
        fds = [self._config_fd, self._parent_read]
        if self._listener is not None:
            env[ENV_LISTEN_FD] = str(self._listener.fileno())
            fds.append(self._listener.fileno())
        else:
            assert self._reserved is not None
            env[ENV_REUSEPORT] = str(self._reserved.getsockname()[1])
        if self.config.admin is not None:
            env[ENV_ADMIN_SOCKET] = self._admin_socket(worker)
        worker.listening = worker.ready = False
        worker.started = worker.last_ping = time.monotonic()
        worker.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ssefan",
            "serve",
            "--config",
            self.config.source,
            *self.log_args,
            env=env,
            pass_fds=fds,
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C reaches the supervisor only,
            # which passes it on once (a second signal would skip the drain).
            start_new_session=True,
        )
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)
        for message in self._early.pop(worker.proc.pid, []):
            self._apply(worker, message)
        self._spawn_task(self._reap(worker, worker.proc))

    async def _reap(self, worker: _Worker, proc: asyncio.subprocess.Process) -> None:
        status = await proc.wait()
        worker.listening = worker.ready = False
        self._changed.set()
        if self.stopping.is_set():
            return
        lived = time.monotonic() - worker.started
        worker.quick_deaths = worker.quick_deaths + 1 if lived < STABLE_AFTER else 1
        delay = _backoff(worker.quick_deaths)
        log.warning(
            "worker %d (pid %d) exited with %s after %.1fs; restarting in %.1fs",
            worker.index,
            proc.pid,
            _describe_exit(status),
            lived,
            delay,
        )
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.stopping.wait()
            if self.stopping.is_set():
                return
            try:
                await self._spawn(worker)
            except Exception as exc:
                # Any failure (EMFILE, ENOMEM, EAGAIN from fork...): this task is the only
                # one that restarts this worker: it must not end here.
                worker.quick_deaths += 1
                delay = _backoff(worker.quick_deaths)
                log.error(
                    "worker %d could not be started (%s); trying again in %.1fs",
                    worker.index,
                    f"{type(exc).__name__}: {exc}",
                    delay,
                )
                continue
            worker.restarts += 1
            return

    async def _watch(self) -> None:
        """Send systemd our watchdog pings and STATUS; kill workers whose loop is stuck."""
        interval = watchdog_interval() or WORKER_WATCHDOG / 2
        tick = min(interval, WORKER_WATCHDOG / 4)
        while not self.stopping.is_set():
            self.notifier.watchdog()
            self.notifier.status(self.status_line())
            now = time.monotonic()
            for worker in self.workers:
                pid = worker.pid
                if pid is not None and now - worker.last_ping > WORKER_WATCHDOG:
                    log.error(
                        "worker %d (pid %d) sent no watchdog ping for %gs: killing it",
                        worker.index,
                        pid,
                        WORKER_WATCHDOG,
                    )
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    worker.last_ping = now  # once; _reap restarts it
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):
                    await self.stopping.wait()

    def _on_notify(self) -> None:
        while True:
            try:
                data, ancdata, _, _ = self._notify.recvmsg(
                    NOTIFY_MAX_DATAGRAM, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            pid = uid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _ = _CREDENTIALS.unpack(payload[: _CREDENTIALS.size])
            # The abstract socket's name is visible in /proc/net/unix and any
            # local process may send to it: only our own workers are heard.
            if pid is None or uid != self._uid:
                self._stranger(pid)
                continue
            message = data.decode("utf-8", "replace")
            worker = next((w for w in self.workers if w.pid == pid), None)
            if worker is not None:
                self._apply(worker, message)
                self._changed.set()
            elif _parent_of(pid) == os.getpid():
                # A worker still being spawned (the only children we have).
                early = self._early.setdefault(pid, [])
                if len(early) < EARLY_MESSAGES_KEPT:
                    early.append(message)
            else:
                self._stranger(pid)

    def _stranger(self, pid: int | None) -> None:
        self._strangers += 1
        if self._strangers == 1 or self._strangers % 1000 == 0:
            log.warning(
                "ignored %d notify message(s) not from a worker (the last from pid %s)",
                self._strangers,
                pid,
            )

    def _apply(self, worker: _Worker, message: str) -> None:
        fields = dict(line.split("=", 1) for line in message.split("\n") if "=" in line)
        if fields.get("WATCHDOG") == "1":
            worker.last_ping = time.monotonic()
        if fields.get("LISTENING") == "1":
            worker.listening = True
        if fields.get("RELOADING") == "1" or fields.get("STOPPING") == "1":
            worker.ready = False
        if fields.get("READY") == "1":
            worker.ready = True
        if "STATUS" in fields:
            worker.status = fields["STATUS"]

    def _admin_socket(self, worker: _Worker) -> str:
        return f"@{self._token}/admin-{worker.index}"

    # -- admin source -----------------------------------------------------------------

    def readiness(self) -> list[str]:
        return [
            f"worker {w.index} " + ("not running" if w.pid is None else "not ready")
            for w in self.workers
            if w.pid is None or not w.ready
        ]

    def status_line(self) -> str:
        ready = sum(1 for w in self.workers if w.pid is not None and w.ready)
        parts = [f"{ready}/{len(self.workers)} workers ready"]
        parts += [f"worker {w.index}: {w.status}" for w in self.workers if w.status]
        return "; ".join(parts)

    async def families(self) -> list[metrics.Family]:
        live = [w for w in self.workers if w.pid is not None]
        gathered = await asyncio.gather(*(self._scrape(w) for w in live))
        info = metrics.Family("ssefan_worker_info", "gauge", "Worker processes (value 1).")
        restarts = metrics.Family(
            "ssefan_worker_restarts_total", "counter", "Workers restarted after dying."
        )
        for worker in self.workers:
            if worker.pid is not None:
                info.add({"worker": str(worker.index), "pid": str(worker.pid)}, 1)
            restarts.add({"worker": str(worker.index)}, worker.restarts)
        reloads = metrics.Family(
            "ssefan_supervisor_reloads_total", "counter", "Reloads the supervisor handled."
        )
        for result, count in self.reloads.items():
            reloads.add({"result": result}, count)
        per_worker = [(str(w.index), families) for w, families in zip(live, gathered, strict=True)]
        return metrics.merge(per_worker, [info, restarts, reloads])

    async def _scrape(self, worker: _Worker) -> list[metrics.Family]:
        request = h11.Request(method="GET", target="/metrics.json", headers=[("host", "worker")])
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                connection = await connect_unix(unix_address(self._admin_socket(worker)))
                try:
                    # No body limit: the answer is our own worker's, and only
                    # as large as its routes and channels make it.
                    reply = await fetch(connection, request)
                finally:
                    connection.close()
            if reply.status != 200:
                raise ValueError(f"HTTP/1.1 {reply.status} {reply.reason.decode('latin-1')}")
            return metrics.from_json(reply.body)
        except (OSError, TimeoutError, ValueError, OriginProtocolError) as exc:
            log.warning("metrics of worker %d unavailable: %r", worker.index, exc)
            return []

    # -- signals ------------------------------------------------------------------------

    def _signal_workers(self, sig: signal.Signals, *, only_listening: bool = False) -> None:
        for worker in self.workers:
            pid = worker.pid
            if pid is not None and (worker.listening or not only_listening):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)

    def _terminate(self) -> None:
        if not self.stopping.is_set():
            log.info("SIGTERM: draining every worker")
            self.stopping.set()

    def _interrupt(self) -> None:
        if not self.stopping.is_set():
            log.info("SIGINT: draining every worker (again to skip the drain)")
            self.stopping.set()
        elif not self._hurried:
            self._hurried = True
            self._signal_workers(signal.SIGINT)

    def _reload(self) -> None:
        if self.stopping.is_set():
            return
        self.notifier.reloading()
        source = self.config.source
        try:
            text = Path(source).read_bytes().decode("utf-8-sig")
            new = parse_config(text, source)
        except (OSError, UnicodeDecodeError) as exc:
            log.error("reload: cannot read %s: %s; still running the previous config", source, exc)
            self.reloads["failed"] += 1
            self.notifier.ready(self.status_line())
            return
        except ConfigError as err:
            for problem in err.problems:
                log.error("reload: %s", problem)
            log.error(
                "reload failed with %d problem(s): every worker keeps the previous config",
                len(err.problems),
            )
            self.reloads["failed"] += 1
            self.notifier.ready(self.status_line())
            return
        for line in reloading.plan(self.config, new).needs_restart:
            log.warning("reload: %s", line)
        logs.remember_secrets(new)
        self._write_config(text)
        self.config = reloading.keep_fixed(self.config, new)
        for worker in self.workers:
            worker.ready = False
        # A worker still starting reads the new text from the memfd anyway,
        # and has no SIGHUP handler yet (the signal would kill it).
        self._signal_workers(signal.SIGHUP, only_listening=True)
        self.reloads["ok"] += 1
        log.info("reload: passed %s on to %d workers", source, len(self.workers))
        self._spawn_task(self._announce_ready())

    def _write_config(self, text: str) -> None:
        # Over the old version, then cut to length: a worker reading meanwhile
        # gets the old version, or the new one (worker.read_fd checks), never
        # an empty file as truncating first would give it.
        data = encode_config(text)
        os.pwrite(self._config_fd, data, 0)
        os.ftruncate(self._config_fd, len(data))

    # -- shutdown -----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self.notifier.stopping()
        self._signal_workers(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None and w.pid is not None]
        if procs:
            waits = [asyncio.ensure_future(p.wait()) for p in procs]
            _, pending = await asyncio.wait(
                waits, timeout=self.config.shutdown_timeout + KILL_GRACE
            )
            for proc in procs:
                if proc.returncode is None:
                    log.error("worker pid %d did not exit in time: killing it", proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=KILL_GRACE)
        for task in list(self._tasks):
            task.cancel()
        if self.admin is not None:
            await self.admin.stop()
        log.info("ssefan stopped")

    def _close(self) -> None:
        for sock in (self._listener, self._reserved, self._notify):
            if sock is not None:
                sock.close()
        for fd in (self._config_fd, self._parent_read, self._parent_write):
            os.close(fd)
        self.notifier.close()


def _backoff(quick_deaths: int) -> float:
    low, high = RESTART_DELAY
    return float(min(high, low * 2 ** min(quick_deaths - 1, 32)))


def _parent_of(pid: int) -> int | None:
    """`pid`'s parent pid (from /proc), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses.
    after = fields[fields.rfind(b")") + 2 :].split()
    return int(after[1]) if len(after) > 1 else None


def _describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"signal {signal.Signals(-status).name}"
        except ValueError:
            return f"signal {-status}"
    return f"status {status}"


def supervise(config: Config) -> int:
    """Run `config.workers` workers until TERM/INT. The config file is read
    again here so the workers get its exact text."""
    source = config.source
    try:
        text = Path(source).read_bytes().decode("utf-8-sig")
        config = parse_config(text, source)
    except (OSError, UnicodeDecodeError, ConfigError) as exc:
        log.error("cannot start workers from %s: %s", source, exc)
        return 2

    async def main() -> int:
        return await Supervisor(config, text, logs.current_options()).run()

    # The supervisor moves no client bytes: asyncio's own loop is plenty.
    return asyncio.run(main())
