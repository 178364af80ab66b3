"""Wiring and lifecycle: channels, upstreams and the listener for one Config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable

from .channel import Channel, DisconnectReason
from .config import Config
from .server import Server
from .upstream import Upstream

__all__ = ["App", "run", "serve"]

log = logging.getLogger("ssefan")

# Pending connections the kernel queues for us. A reconnect storm of thousands
# of browsers arrives within a second; 4096 is also nginx's default on Linux.
LISTEN_BACKLOG = 4096
# How long shutdown waits for upstream tasks to notice cancellation.
STOP_TIMEOUT = 5.0


class App:
    """One running ssefan: the listener, a channel and an upstream per route."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.channels: dict[str, Channel] = {}
        self.upstreams: dict[str, Upstream] = {}
        self.server: Server | None = None
        self.listener: asyncio.Server | None = None

    async def start(self, sock: socket.socket | None = None) -> None:
        loop = asyncio.get_running_loop()
        for route in self.config.routes:
            channel = Channel(route, loop=loop)
            upstream = Upstream(route.upstream, channel, route=route.path)
            channel.attach_source(upstream)
            self.channels[route.path] = channel
            self.upstreams[route.path] = upstream
        self.server = Server(self.config, self.channels)
        listen = self.config.listen
        if sock is not None:
            self.listener = await loop.create_server(
                self.server.protocol_factory, sock=sock, backlog=LISTEN_BACKLOG
            )
        else:
            self.listener = await loop.create_server(
                self.server.protocol_factory,
                listen.host,
                listen.port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
        for channel in self.channels.values():
            channel.start()
        routes = ", ".join(f"{r.path} <- {r.upstream.url}" for r in self.config.routes)
        log.info("ssefan listening on %s (routes: %s)", self.url, routes or "none")

    @property
    def address(self) -> tuple[str, int]:
        assert self.listener is not None
        sockname = self.listener.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for channel in self.channels.values():
            channel.close(DisconnectReason.DRAIN)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_TIMEOUT):
                for upstream in self.upstreams.values():
                    await upstream.wait_stopped()
        if self.server is not None:
            for connection in list(self.server.connections):
                if connection.transport is not None:
                    connection.transport.close()
        log.info("ssefan stopped")


async def run(
    config: Config,
    *,
    setup: Callable[[App], Awaitable[None]] | None = None,
) -> int:
    """Run until SIGTERM or SIGINT."""
    app = App(config)
    await app.start()
    if setup is not None:
        await setup(app)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await app.stop()
    return 0


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (it is a runtime dependency), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def serve(config: Config) -> int:
    """`ssefan serve`: run the config until a signal says stop."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(run(config))
