"""`ssefan demo`: a built-in ticker upstream with ssefan in front of it.

Needs no app of your own: the ticker is a tiny SSE server on a free loopback
port that publishes one event per second with an id, and resumes from
Last-Event-ID like a well-behaved app. ssefan subscribes to it once and serves
`/events` to any number of browsers; `/` is a page that shows the live stream
through EventSource, including what a reconnect looks like.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import resources

import h11

from ssefan.config import Config, CorsConfig, ListenConfig, RouteConfig, StartConfig, UpstreamConfig
from ssefan.core.sse import Event, encode
from ssefan.edge.downstream import Downstream
from ssefan.http.flow import READ_WINDOW
from ssefan.http.responses import response_head
from ssefan.ops.app import App, new_event_loop

__all__ = ["Ticker", "demo_config", "run_demo"]

log = logging.getLogger("ssefan.demo")


class Ticker:
    """A minimal SSE app: `GET /events` ticks every `interval` seconds.

    Event n has id str(n). A request with Last-Event-ID: n continues at n+1,
    so ssefan's upstream resume is visible in the demo too.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.started = time.time()
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = await asyncio.start_server(self._handle, host, port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    def current(self) -> int:
        return int((time.time() - self.started) / self.interval)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # h11 reads the request, as everywhere else in ssefan: a head over one
        # read window, or a connection closed before a whole head, gets no answer.
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=READ_WINDOW)
        try:
            request = await _read_request(conn, reader)
        except (h11.RemoteProtocolError, ConnectionError):
            request = None
        if request is None:
            writer.close()
            return
        last = next(
            (v.decode("latin-1").strip() for n, v in request.headers if n == b"last-event-id"), ""
        )
        n = int(last) + 1 if last.isdigit() else self.current()
        headers = [
            (b"content-type", b"text/event-stream"),
            (b"cache-control", b"no-cache"),
            (b"connection", b"close"),
        ]
        try:
            writer.write(conn.send(response_head(200, headers)))
            while True:
                payload = json.dumps({"n": n, "at": time.strftime("%H:%M:%S")})
                writer.write(
                    conn.send(h11.Data(data=encode(Event(payload, event="tick", id=str(n)))))
                )
                await writer.drain()
                n += 1
                await asyncio.sleep(self.interval)
        except ConnectionError:
            pass  # ssefan went away; it reconnects with Last-Event-ID
        except asyncio.CancelledError:
            # Shutdown cancels this leaf task; finishing quietly is the point.
            return
        finally:
            writer.close()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The request's head, or None if the connection ended before one."""
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is not h11.NEED_DATA:
            return None
        conn.receive_data(await reader.read(READ_WINDOW))


def demo_config(host: str, port: int, ticker_port: int) -> Config:
    return Config(
        listen=ListenConfig(host=host, port=port),
        routes=(
            RouteConfig(
                path="/events",
                upstream=UpstreamConfig(url=f"http://127.0.0.1:{ticker_port}/events"),
                buffer=300,
                heartbeat=15.0,
                retry=2000,
                # A new page shows the last few ticks at once: the ring at work.
                start=StartConfig(kind="events", count=5),
                cors=CorsConfig(allow_origins=("*",)),
            ),
        ),
        source="<demo>",
    )


def _page() -> bytes:
    return resources.files("ssefan").joinpath("demo.html").read_bytes()


def _serve_page(connection: Downstream, request: h11.Request) -> bool:
    if request.target.split(b"?", 1)[0] != b"/" or request.method not in (b"GET", b"HEAD"):
        return False
    connection.respond(200, _page(), content_type=b"text/html; charset=utf-8")
    return True


async def _main(host: str, port: int) -> int:
    ticker = Ticker()
    await ticker.start()
    app = App(demo_config(host, port, ticker.port))
    await app.start()
    assert app.server is not None
    app.server.fallback = _serve_page
    print(f"ssefan demo: ticker upstream on http://127.0.0.1:{ticker.port}/events", flush=True)
    print(f"ssefan demo: open {app.url}/ in a browser (stream: {app.url}/events)", flush=True)
    print("ssefan demo: press Ctrl-C to stop", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await app.stop()
        await ticker.stop()
    return 0


def run_demo(host: str = "127.0.0.1", port: int = 8080) -> int:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_main(host, port))
