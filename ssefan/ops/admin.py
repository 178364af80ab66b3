"""The admin listener: /healthz, /readyz, /metrics and a live status page.

Off the hot path and off the client port: a small h11 server on its own
address (`admin: {listen: 127.0.0.1:9090}`), or on a private Unix socket where
a supervisor collects its workers' metrics. One request per connection
(`Connection: close`), which is all a scraper or a browser tab needs.

    GET /healthz       200 while the process (its event loop) answers
    GET /readyz        200 when listening and every eager upstream streams, else 503
    GET /metrics       Prometheus text format
    GET /metrics.json  the same families as JSON (what a supervisor merges)
    GET /              status page, updated live from /status
    GET /status        SSE: one JSON event per second with each route's
                       clients, event rate, upstream state and last upstream
                       failure (kind, text, count, next attempt), and why
                       the process is not ready
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from importlib import resources
from typing import Protocol, runtime_checkable

import h11

from ssefan.core.sse import encode_comment
from ssefan.http.responses import response_head
from ssefan.ops import metrics
from ssefan.ops.sockets import http_url, listen_error
from ssefan.stream.upstream import Upstream

__all__ = ["Admin", "AdminSource"]

log = logging.getLogger("ssefan.admin")

# An admin request is a GET with a few headers; 8 KiB leaves room for a
# browser's cookies and refuses anything bigger before it is buffered.
MAX_REQUEST_HEAD = 8 * 1024
# Time to send that head: the same slowloris guard as the client port.
REQUEST_TIMEOUT = 10.0
# The status page's update rate: fast enough to look live, cheap to render.
# One rendering per interval is shared by every open status page.
STATUS_INTERVAL = 1.0
# Admin connections open at once; more are answered 503 and closed. A scraper,
# a supervisor and a few status pages need a handful: 64 leaves plenty while
# a client holding connections open can't take memory or file descriptors
# from the streams on the client port.
MAX_ADMIN_CONNECTIONS = 64
# Time a response (or one status update) may take to be written: a client
# that stops reading is cut off instead of holding its connection and buffer.
WRITE_TIMEOUT = 10.0


class AdminSource(Protocol):
    """What the admin endpoints report on: one App, or a supervisor's workers."""

    def readiness(self) -> list[str]:
        """Why the process is not ready yet; empty when it is."""
        ...

    def families(self) -> Awaitable[list[metrics.Family]]: ...


@runtime_checkable
class UpstreamsSource(Protocol):
    """A source that holds its upstreams (an App; a supervisor's are in its
    workers): the status page then shows each route's last upstream failure."""

    @property
    def upstreams(self) -> Mapping[str, Upstream]: ...


Handler = Callable[[h11.Request], Awaitable[tuple[int, bytes, bytes]]]


class Admin:
    def __init__(self, source: AdminSource) -> None:
        self.source = source
        self.server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._stopping = asyncio.Event()
        self._status = _StatusFeed(source, self._stopping)
        # Set for a listener on a loopback address: see _rebinding_guard.
        self._loopback = False

    # -- lifecycle ---------------------------------------------------------------

    async def start_tcp(self, host: str, port: int) -> None:
        try:
            self.server = await asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=MAX_REQUEST_HEAD
            )
        except OSError as exc:
            # Port in use, no such address: said like listen's, naming admin.listen.
            problem = listen_error("admin.listen", host, port, exc)
            if problem is None:
                raise
            raise problem from exc
        self._loopback = all(_is_loopback(str(s.getsockname()[0])) for s in self.server.sockets)
        log.info("admin endpoints at %s (/healthz /readyz /metrics /)", self.url)

    async def start_unix(self, sock: socket.socket) -> None:
        """Serve on an already bound and listening Unix socket (a worker's private one)."""
        self.server = await asyncio.start_unix_server(
            self._serve, sock=sock, limit=MAX_REQUEST_HEAD
        )

    @property
    def url(self) -> str:
        assert self.server is not None
        host, port = self.server.sockets[0].getsockname()[:2]
        return http_url(str(host), port)

    async def stop(self) -> None:
        self._stopping.set()
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    # -- one connection ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= MAX_ADMIN_CONNECTIONS:
            # Answered without reading the request: nothing of it is buffered.
            body = b"503 too many admin connections, retry shortly\n"
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: %d\r\nretry-after: 1\r\nconnection: close\r\n\r\n%b"
                % (len(body), body)
            )
            writer.close()  # flushes what fits into the socket buffer, then closes
            return
        self._writers.add(writer)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = await _read_request(conn, reader)
            if request is None:
                return
            path = request.target.split(b"?", 1)[0]
            if self._loopback and not _local_host(request):
                await _respond(conn, writer, 421, MISDIRECTED)
            elif request.method not in (b"GET", b"HEAD"):
                await _respond(conn, writer, 405, b"405 use GET\n")
            elif path == b"/status":
                await self._status_stream(conn, writer)
            else:
                status, body, content_type = await self._route(path)
                await _respond(conn, writer, status, body, content_type, head=request.method)
        except (TimeoutError, ConnectionError, h11.ProtocolError):
            # A broken or stuck admin client concerns nobody else; what it
            # left unread is dropped, not kept until it reads.
            writer.transport.abort()
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _route(self, path: bytes) -> tuple[int, bytes, bytes]:
        text = b"text/plain; charset=utf-8"
        if path == b"/healthz":
            return 200, b"ok\n", text
        if path == b"/readyz":
            reasons = self.source.readiness()
            if reasons:
                return 503, ("not ready: " + "; ".join(reasons) + "\n").encode(), text
            return 200, b"ready\n", text
        if path == b"/metrics":
            return 200, metrics.render(await self.source.families()), metrics.CONTENT_TYPE
        if path == b"/metrics.json":
            return 200, metrics.to_json(await self.source.families()), b"application/json"
        if path == b"/":
            page = resources.files("ssefan").joinpath("status.html").read_bytes()
            return 200, page, b"text/html; charset=utf-8"
        return 404, b"404 not found: try /healthz, /readyz, /metrics or /\n", text

    async def _status_stream(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"connection", b"close"),
        ]
        writer.write(
            conn.send(response_head(200, headers)) + conn.send(h11.Data(data=encode_comment("")))
        )
        seen = 0
        with self._status.viewing():
            while not self._stopping.is_set():
                data = await self._status.after(seen)
                if data is None:
                    return
                seen = self._status.version
                writer.write(conn.send(h11.Data(data=data)))
                await _drain(writer)


class _StatusFeed:
    """The /status event, rendered once per STATUS_INTERVAL while anyone
    watches, and the same bytes written to every viewer."""

    def __init__(self, source: AdminSource, stopping: asyncio.Event) -> None:
        self.source = source
        self.stopping = stopping
        self.version = 0  # of `data`; 0 = nothing rendered yet
        self.data = b""
        self.viewers = 0
        self._rendered = asyncio.Event()  # set (and replaced) on each rendering
        self._task: asyncio.Task[None] | None = None
        self._previous: dict[str, tuple[int, float]] = {}

    @contextlib.contextmanager
    def viewing(self) -> Iterator[None]:
        self.viewers += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._render_while_watched())
        try:
            yield
        finally:
            self.viewers -= 1

    async def after(self, version: int) -> bytes | None:
        """The first rendering newer than `version` (None when stopping)."""
        while self.version <= version:
            if self.stopping.is_set() or self._task is None:
                return None
            await self._rendered.wait()
        return self.data

    async def _render_while_watched(self) -> None:
        try:
            while self.viewers and not self.stopping.is_set():
                try:
                    self._render(await self.source.families())
                except Exception:
                    log.exception("status page: rendering failed")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(STATUS_INTERVAL):
                        await self.stopping.wait()
        finally:
            self._task = None
            self._previous.clear()  # rates start over with the next viewer
            self._wake()

    def _render(self, families: list[metrics.Family]) -> None:
        snapshot = metrics.status(families)
        snapshot["not_ready"] = self.source.readiness()
        source = self.source
        upstreams = source.upstreams if isinstance(source, UpstreamsSource) else {}
        now = time.monotonic()
        routes = snapshot["routes"]
        assert isinstance(routes, list)
        for row in routes:
            events, before = int(row["events"]), self._previous.get(row["route"])
            if before is not None and now > before[1]:
                row["rate"] = round((events - before[0]) / (now - before[1]), 2)
            self._previous[row["route"]] = (events, now)
            upstream = upstreams.get(row["route"])
            if upstream is not None:
                row["url"] = upstream.url
                row["failure"] = _failure_row(upstream)
        self.data = f"data: {json.dumps(snapshot, separators=(',', ':'))}\n\n".encode()
        self.version += 1
        self._wake()

    def _wake(self) -> None:
        rendered, self._rendered = self._rendered, asyncio.Event()
        rendered.set()


def _failure_row(upstream: Upstream) -> dict[str, object] | None:
    """The last failure as the status page shows it (None: none yet)."""
    failure = upstream.last_failure
    if failure is None:
        return None
    return {
        "kind": failure.kind.value,
        "text": failure.text,
        "url": failure.url,
        "count": failure.count,  # in a row; 0 once streaming again
        "at": failure.at,  # unix time
        "next_attempt": failure.next_attempt_wall,  # unix time, or null
    }


# DNS rebinding: a web page whose name is made to resolve to 127.0.0.1 could
# read a loopback admin listener from the victim's browser (same origin as far
# as the browser knows). Such a request carries the page's name as its Host.
# A loopback listener therefore answers only Hosts that are an IP address or
# `localhost`, which is how local scrapers (Prometheus, curl) address it.
MISDIRECTED = (
    b"421 the admin listener is on loopback and answers Host: 127.0.0.1, [::1] or"
    b" localhost (with any port) only; use one of those in the URL\n"
)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _local_host(request: h11.Request) -> bool:
    """True if the request's Host is an IP literal or localhost (any port)."""
    hosts = [value for name, value in request.headers if name == b"host"]
    if not hosts:
        return True  # HTTP/1.0 without a Host: no browser sends that
    host = hosts[0].decode("latin-1").strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    else:
        host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if host.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _drain(writer: asyncio.StreamWriter) -> None:
    """Wait until what was written is handed to the kernel, at most WRITE_TIMEOUT."""
    async with asyncio.timeout(WRITE_TIMEOUT):
        await writer.drain()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            return event
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(MAX_REQUEST_HEAD))
            continue
        return None  # ConnectionClosed before a request


async def _respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    content_type: bytes = b"text/plain; charset=utf-8",
    head: bytes = b"GET",
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
        (b"connection", b"close"),
    ]
    out = conn.send(response_head(status, headers))
    if head != b"HEAD":
        out += conn.send(h11.Data(data=body))
    writer.write(out + conn.send(h11.EndOfMessage()))
    await _drain(writer)
