"""Wiring and lifecycle: channels, upstreams and the listener for one Config.

`App` is one running ssefan (start, reload, drain, stop). `run()` starts one on
the socket it is given (socket activation, a worker's) or binds its own, and
runs ops.process.Process around it: signals, sd_notify, the admin listener.
The drain's algorithm is ops.drain. `serve()` hands `workers: N > 1` to the
supervisor.

Past 400 lines, knowingly: one App's wiring and the reload that rewires it
act on the same registries (channels, template routes, upstreams, forward-auth,
the budgets), in one event-loop step each; the drain algorithm is drain.py's,
the process around it process.py's, what a reload changes reload.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable

from ssefan import __version__
from ssefan.config import Config, RouteConfig, UpstreamConfig
from ssefan.core.cursors import DisconnectReason
from ssefan.core.persist import ChannelId
from ssefan.core.ring import RingBudget
from ssefan.core.template import is_template
from ssefan.edge.auth import ForwardAuth, forward_auth, forward_auths, unused_pools
from ssefan.edge.proxy import Proxy
from ssefan.edge.server import Server
from ssefan.http.client import Origin
from ssefan.http.pool import ConnectionPool
from ssefan.ops import metrics
from ssefan.ops import reload as reloading
from ssefan.ops.drain import drain_streams, end_spread
from ssefan.ops.process import Process
from ssefan.ops.sockets import LISTEN_BACKLOG, http_url, listen_error, systemd_listener
from ssefan.ops.tls import CertificateSwap
from ssefan.ops.worker import WorkerEnv
from ssefan.stream.channel import Channel, StreamBudget
from ssefan.stream.keyed import KEY_GONE_STATUSES, ChannelBudget, CloseReason, KeyedChannels
from ssefan.stream.persistence import Persistence
from ssefan.stream.upstream import Upstream, UpstreamCounts, UpstreamState

__all__ = ["App", "new_event_loop", "run", "serve"]

log = logging.getLogger("ssefan")

# How long shutdown waits for upstream tasks to notice cancellation.
STOP_TIMEOUT = 5.0
# At stop, how long closing client connections get to finish (see
# _connections_closed).
CLOSE_WAIT = 1.0
# A reload that changes a route's forward-auth ends the route's streams (they
# were admitted under other rules) over at most this long, each with a
# jittered `retry:` as in a drain, so they come back through the new auth
# spread out rather than all asking it at once.
AUTH_RELOAD_WINDOW = 2.0


class App:
    """One running ssefan: the listener, a channel and an upstream per route."""

    def __init__(self, config: Config, *, worker: int = 0) -> None:
        self.config = config
        self.worker = worker  # the supervisor's worker index (0 alone): state files are per worker
        # Rings kept across restarts (state_dir), made at start.
        self.persistence: Persistence | None = None
        self.channels: dict[str, Channel] = {}
        # max_clients across every route, counted by the channels themselves.
        self.budget = StreamBudget(config.max_clients)
        self.upstreams: dict[str, Upstream] = {}
        # Template routes: their keys' channels, made and freed on demand.
        self.keyed: dict[str, KeyedChannels] = {}
        self.channel_budget = ChannelBudget(config.max_channels)
        # Every ring's bytes, static and keyed, against ring_bytes_total.
        self.ring_budget = RingBudget(config.ring_bytes_total)
        self.server: Server | None = None
        self.listener: asyncio.Server | None = None
        # listen.tls: the listener's context and the certificate a reload swaps in.
        self.tls: CertificateSwap | None = None
        # Pass-through to `app` (None without one) and forward-auth by route.
        self.proxy: Proxy | None = None
        self.auth: dict[str, ForwardAuth] = {}
        self._auth_pools: dict[Origin, ConnectionPool] = {}  # shared by routes' ForwardAuth
        self._tasks: set[asyncio.Task[int]] = set()  # streams being ended after a reload
        self.started_at = time.time()
        self.reloads = {"ok": 0, "failed": 0}
        # Set on every upstream state change: readiness is waited for on it.
        self._upstream_changed = asyncio.Event()
        self._rng = random.Random()

    async def start(self, sock: socket.socket | None = None, *, announce: bool = True) -> None:
        """Listen and subscribe. `announce` logs the "listening on" line (a
        supervisor's workers leave that line to the supervisor)."""
        loop = asyncio.get_running_loop()
        if self.config.state_dir is not None:
            self.persistence = Persistence(
                self.config.state_dir,
                state_sync=self.config.state_sync,
                worker=self.worker,
                loop=loop,
            )
        # Rings are restored here, before the listener accepts anyone.
        for route in self.config.routes:
            self._add_route(route)
        if self.persistence is not None:
            # After the routes' own files were read (a bad one is set aside
            # with its reason there): what is left belongs to no channel.
            self.persistence.remove_stale(self._keeps_state)
        self.proxy = Proxy(self.config) if self.config.app is not None else None
        self.auth = forward_auths(self.config, self._auth_pools)
        self.server = Server(
            self.config,
            self.channels,
            pass_through=self.proxy.forward if self.proxy is not None else None,
            auth=self.auth,
            keyed=self.keyed,
        )
        listen = self.config.listen
        if listen.tls is not None:
            self.tls = CertificateSwap(listen.tls)
        context = self.tls.listening if self.tls is not None else None
        # The handshake comes before the request head's header_timeout is
        # armed (connection_made follows it): the same slowloris bound.
        handshake = self.config.header_timeout if context is not None else None
        if sock is not None:
            self.listener = await loop.create_server(
                self.server.protocol_factory,
                sock=sock,
                backlog=LISTEN_BACKLOG,
                ssl=context,
                ssl_handshake_timeout=handshake,
            )
        else:
            try:
                self.listener = await loop.create_server(
                    self.server.protocol_factory,
                    listen.host,
                    listen.port,
                    backlog=LISTEN_BACKLOG,
                    reuse_address=True,
                    ssl=context,
                    ssl_handshake_timeout=handshake,
                )
            except OSError as exc:
                problem = listen_error("listen", listen.host, listen.port, exc)
                if problem is None:
                    raise
                raise problem from exc
        for channel in self.channels.values():
            channel.start()
        for auth in self.auth.values():
            auth.start()
        if self.persistence is not None:
            self.persistence.start()
        routes = ", ".join(f"{r.path} <- {r.upstream.url}" for r in self.config.routes)
        if announce:
            log.info("ssefan listening on %s (routes: %s)", self.url, routes or "none")
        else:
            log.info("worker accepting connections at %s", self.url)

    def _add_route(self, route: RouteConfig) -> Channel | None:
        """A static route's channel (to start), or a template route's owner (None)."""
        loop = asyncio.get_running_loop()
        persistence = self.persistence
        if is_template(route.path):
            family = KeyedChannels(
                route,
                loop=loop,
                budget=self.budget,
                channel_budget=self.channel_budget,
                ring_budget=self.ring_budget,
                make_source=self._key_upstream,
            )
            if persistence is not None:
                family.on_open = lambda channel, key: persistence.attach(
                    channel, family.route, family.display(key)
                )
                family.on_free = persistence.forget
            self.keyed[route.path] = family
            return None
        channel = Channel(route, loop=loop, budget=self.budget, ring_budget=self.ring_budget)
        channel.attach_source(self._new_upstream(route, channel))
        if persistence is not None:
            persistence.attach(channel, route)
        self.channels[route.path] = channel
        return channel

    def _keeps_state(self, identity: ChannelId) -> bool:
        """Whether a state file belongs to a route (and worker) of this config."""
        paths = {route.path for route in self.config.routes}
        return identity.route in paths and identity.worker < self.config.workers

    def _key_upstream(
        self, channel: Channel, upstream: UpstreamConfig, label: str, counts: UpstreamCounts
    ) -> Upstream:
        """A template key's subscription: ends on the app's 404/410/204 for it."""
        return Upstream(
            upstream,
            channel,
            route=label,
            stop_statuses=KEY_GONE_STATUSES,
            counts=counts,
            quiet=True,
        )

    def all_channels(self) -> list[Channel]:
        """Every live channel: the static routes' and the template keys'."""
        channels = list(self.channels.values())
        for family in self.keyed.values():
            channels += family
        return channels

    def _new_upstream(self, route: RouteConfig, channel: Channel) -> Upstream:
        upstream = Upstream(
            route.upstream, channel, route=route.path, on_state=self._on_upstream_state
        )
        self.upstreams[route.path] = upstream
        return upstream

    def _on_upstream_state(self, state: UpstreamState) -> None:
        self._upstream_changed.set()

    @property
    def address(self) -> tuple[str, int]:
        assert self.listener is not None
        sockname = self.listener.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def url(self) -> str:
        return http_url(*self.address, tls=self.tls is not None)

    # -- readiness and metrics ---------------------------------------------------

    def readiness(self) -> list[str]:
        """Why this process is not ready; empty when listening and every eager
        upstream streams (what /readyz and READY=1 report)."""
        if self.listener is None or not self.listener.is_serving():
            return ["not listening"]
        # Each reason names the route, the state and, after a failure, its
        # kind, text, count, URL (redacted) and when the next attempt is due.
        return [
            f"{path} upstream {self.upstreams[path].problem()}"
            for path, channel in self.channels.items()
            if channel.route.mode == "eager"
            and self.upstreams[path].state is not UpstreamState.STREAMING
        ]

    async def wait_ready(self, within: float) -> bool:
        """Wait until ready, at most `within` seconds; True if it got there."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while self.readiness():
                    self._upstream_changed.clear()
                    await self._upstream_changed.wait()
        return not self.readiness()

    async def families(self) -> list[metrics.Family]:
        server = self.server
        process = metrics.ProcessInfo(
            version=__version__,
            started_at=self.started_at,
            ready=not self.readiness(),
            refused=server.refused if server is not None else {},
            connections=len(server.connections) if server is not None else 0,
            reloads=self.reloads,
            proxy=self.proxy.stats if self.proxy is not None else None,
            auth={path: auth.stats for path, auth in self.auth.items()},
            http2=server.http2 if server is not None else {},
        )
        return metrics.collect(self.channels, self.upstreams, process, self.keyed, self.ring_budget)

    def status_line(self) -> str:
        """STATUS= for systemd: what `systemctl status` shows under the unit."""
        clients = sum(channel.client_count for channel in self.all_channels())
        streaming = sum(u.state is UpstreamState.STREAMING for u in self.upstreams.values())
        routes = len(self.channels) + len(self.keyed)
        keys = sum(len(family.channels) for family in self.keyed.values())
        return (
            f"{_count(clients, 'client')} on {_count(routes, 'route')};"
            f" {streaming}/{len(self.upstreams)} upstreams streaming"
            + (f"; {_count(keys, 'template key')} live" if self.keyed else "")
        )

    # -- reload -------------------------------------------------------------------

    def reload(self, new: Config) -> reloading.ReloadPlan:
        """Apply a validated config in one event-loop step (no await: no client
        sees half of it). Clients of kept routes stay connected."""
        change = reloading.plan(self.config, new)
        for line in change.needs_restart:
            log.warning("reload: %s", line)
        new = reloading.keep_fixed(self.config, new)
        # The files are read again even when the config names the same ones:
        # that is how a renewed certificate is picked up.
        tls = new.listen.tls
        if self.tls is not None and tls is not None and not self.tls.reload(tls):
            new = reloading.keep_listen(self.config, new)
        for path in change.removed:
            if path in self.keyed:
                self.keyed.pop(path).close(DisconnectReason.DRAIN, CloseReason.RELOAD)
                continue
            channel = self.channels.pop(path)
            self.upstreams.pop(path, None)
            channel.close(DisconnectReason.DRAIN)  # clients reconnect and get 404
            if self.persistence is not None:
                self.persistence.forget(channel)  # and its state files go
        for route in change.kept:
            if route.path in self.keyed:
                # Keys whose upstream is unchanged keep their channel and clients.
                self.keyed[route.path].reconfigure(route)
                continue
            channel = self.channels[route.path]
            source = None
            if route.path in change.new_upstream:
                source = self._new_upstream(route, channel)
            channel.reconfigure(route, source)
        for route in change.added:
            added = self._add_route(route)
            if added is not None:
                added.start()
        # Same dict objects (the Server holds them), in the new config's order.
        order = {r.path: self.channels[r.path] for r in new.routes if r.path in self.channels}
        self.channels.clear()
        self.channels.update(order)
        templates = {r.path: self.keyed[r.path] for r in new.routes if r.path in self.keyed}
        self.keyed.clear()
        self.keyed.update(templates)
        self.channel_budget.limit = new.max_channels
        self.ring_budget.limit = new.ring_bytes_total
        if self.ring_budget.held > self.ring_budget.limit:
            self.ring_budget.reclaim()
        self._reconfigure_pass_through(self.config, new)
        reauthorize = self._reconfigure_auth(self.config, new)
        self.config = new
        if self.server is not None:
            self.server.config = new  # limits and timeouts apply to new connections
        self.budget.limit = new.max_clients
        self._upstream_changed.set()
        streams = [
            (channel, sub)
            for path in reauthorize
            for channel in self._channels_of(path)
            for sub in channel.subscribers()
        ]
        if streams:
            log.info(
                "reload: forward-auth changed on %s: ending %d stream(s) over %gs to reconnect"
                " through it",
                ", ".join(reauthorize),
                len(streams),
                AUTH_RELOAD_WINDOW,
            )
            task = asyncio.get_running_loop().create_task(
                end_spread(streams, AUTH_RELOAD_WINDOW, self._rng)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return change

    def _channels_of(self, path: str) -> list[Channel]:
        if path in self.keyed:
            return list(self.keyed[path])
        return [self.channels[path]] if path in self.channels else []

    def _reconfigure_pass_through(self, old: Config, new: Config) -> None:
        """Pass-through follows a reload when its settings changed.

        A replaced Proxy's in-flight requests finish on their own connections;
        closing it only drops its idle pool.
        """
        if self.server is None:
            return
        if _proxy_inputs(old) != _proxy_inputs(new):
            if self.proxy is not None:
                self.proxy.close()
            self.proxy = Proxy(new) if new.app is not None else None
            self.server.pass_through = self.proxy.forward if self.proxy is not None else None

    def _reconfigure_auth(self, old: Config, new: Config) -> list[str]:
        """Forward-auth follows a reload route by route; returns the kept routes
        whose streams were admitted under other rules (to be ended).

        A route whose auth settings (or the trusted proxies, which decide what
        client address the auth endpoint sees) changed gets a new ForwardAuth:
        the old one's asks in flight are cancelled (those clients reconnect)
        and its cached decisions go with it. Its existing streams, admitted by
        the old rules or by none, are ended by the caller so they reconnect
        through the new ones: otherwise adding `auth:` would leave every open
        stream unauthenticated, and revalidation would never see them. Routes
        whose auth did not change keep their ForwardAuth, its cache and its
        revalidation watches.
        """
        if self.server is None:
            return []
        trusted_changed = old.trusted_proxies != new.trusted_proxies
        before = {route.path: route.auth for route in old.routes}
        reauthorize: list[str] = []
        for route in new.routes:
            kept = route.path in before
            unchanged = kept and before[route.path] == route.auth
            if unchanged and (route.auth is None or not trusted_changed):
                continue
            stale = self.auth.pop(route.path, None)
            if stale is not None:
                stale.close()
            if route.auth is not None:
                auth = self.auth[route.path] = forward_auth(route, new, self._auth_pools)
                auth.start()
            if kept:
                reauthorize.append(route.path)
        paths = {route.path for route in new.routes}
        for path in [p for p in self.auth if p not in paths]:
            self.auth.pop(path).close()  # a removed route (its streams are closed)
        for pool in unused_pools(self._auth_pools, self.auth):
            pool.close()
        for pool in self._auth_pools.values():
            pool.idle_timeout = new.proxy.pool_idle_timeout  # for connections parked from now on
        # The Server holds this same dict, in the new config's order.
        order = {
            route.path: self.auth[route.path] for route in new.routes if route.path in self.auth
        }
        self.auth.clear()
        self.auth.update(order)
        return reauthorize

    # -- shutdown -------------------------------------------------------------------

    async def drain(self, window: float, hurry: asyncio.Event | None = None) -> int:
        """Stop accepting, then end every stream, spread over `window` seconds.

        Streams end in random order at an even rate (at least MIN_DRAIN_RATE a
        second), each with a jittered `retry:` first, so the clients' reconnects
        reach the next instance spread out rather than in one burst. Upstreams
        keep feeding the streams not yet ended. Streams that still open meanwhile
        (a keep-alive connection's next request, a forward-auth answer that was
        in flight) are ended the same way rather than cut at stop. `hurry` set
        ends the rest at once. Returns the number of streams ended.
        """
        if self.listener is not None:
            self.listener.close()
        server = self.server
        if server is not None:
            server.draining = True
            idle = [c for c in list(server.connections) if c.close_if_idle()]
            if idle:
                log.info("closed %d idle keep-alive connections", len(idle))
        return await drain_streams(self.all_channels, window, self._rng, hurry)

    async def _connections_closed(self, within: float) -> None:
        """Let closing connections finish (TLS close_notify, the client's last
        bytes read) rather than exit under them: a socket the process leaves
        with unread bytes sends RST, which can destroy what the client has not
        read yet (a drained stream's end)."""
        if self.server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    await self.server.connections_gone()

    async def stop(self, grace: float = STOP_TIMEOUT) -> None:
        """End every stream now, stop the upstreams (waiting up to `grace`
        seconds for them) and close every connection."""
        if self.listener is not None:
            self.listener.close()
        for task in list(self._tasks):
            task.cancel()
        if self.persistence is not None:
            # Before anything closes, every ring's final snapshot; first the
            # upstreams stop, so that no id goes out after it was taken.
            for channel in self.all_channels():
                channel.stop_source()
            await self.persistence.save_all(within=max(0.5, grace))
            self.persistence.drop_unsaved_keys(self.keyed)
        upstreams = list(self.upstreams.values())
        for family in self.keyed.values():
            upstreams += [c.source for c in family if isinstance(c.source, Upstream)]
            family.close(DisconnectReason.DRAIN)
        for channel in self.channels.values():
            channel.close(DisconnectReason.DRAIN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                for upstream in upstreams:
                    await upstream.wait_stopped()
        if self.server is not None:
            for connection in list(self.server.connections):
                if connection.transport is not None:
                    connection.transport.close()
            await self._connections_closed(min(CLOSE_WAIT, grace))
        if self.proxy is not None:
            self.proxy.close()
        for auth in self.auth.values():
            auth.close()
        for pool in self._auth_pools.values():
            pool.close()
        log.info("ssefan stopped")


async def run(
    config: Config,
    *,
    setup: Callable[[App], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT (then drain); SIGHUP reloads the config."""
    worker = WorkerEnv.from_env()
    sock = worker.listener(config) if worker is not None else systemd_listener()
    if sock is not None and worker is None:
        log.info("serving on the socket systemd passed; the config's listen address is not bound")
    # What start-up made (modules, the config) lives as long as the process:
    # out of the collector's way, so that its full passes walk only what
    # serving makes. Before listening: a signal sent once the listening line
    # is logged must find the handlers in place, not a collection.
    gc.collect()
    gc.freeze()
    app = App(config, worker=worker.index if worker is not None else 0)
    await app.start(sock, announce=worker is None)
    if setup is not None:
        await setup(app)
    return await Process(app, worker).run()


def _proxy_inputs(config: Config) -> tuple[object, ...]:
    tokens = tuple(r.auth.token_param for r in config.routes if r.auth is not None)
    return config.app, config.proxy, config.trusted_proxies, tokens


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is a runtime dependency), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(config: Config) -> int:
    """`ssefan serve`: run the config until a signal says stop.

    `workers: N > 1` starts a supervisor, which runs N of these processes."""
    if config.workers > 1 and WorkerEnv.from_env() is None:
        from ssefan.ops.supervisor import supervise

        return supervise(config)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(run(config))
