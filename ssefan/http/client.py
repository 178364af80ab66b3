"""The one HTTP/1.1 client: every request ssefan makes goes through `OriginConnection`.

Its users: the upstream subscription (stream.upstream), forward-auth and the
pass-through proxy (through pool.py), and the supervisor's scrape of its
workers' admin sockets (ops.supervisor, over a Unix socket).

A connection is an `asyncio.Protocol` over an h11 client whose reads and
writes a coroutine pulls and pushes with TCP backpressure both ways (see
flow.py). Two ways to read it:

* `receive()`: the next h11 event, reading as needed (exchanges: the proxy,
  forward-auth, `fetch`).
* `next_event()` and `read()`: h11's next event without waiting, and one
  read handed to h11. The upstream's loop uses them to parse everything one
  read brought as one batch, and to put its idle watchdog on each read.

h11 never sees more than MAX_RESPONSE_HEAD of an unfinished head, and its
complaints reach callers as `OriginProtocolError` with the quoted bytes cut
(they may hold a Set-Cookie). A connection that ends reaches callers as
`OriginClosed`, whose `__cause__` is the socket's own error when there was one.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import h11

from ssefan.http.flow import Inbox, WriteGate
from ssefan.http.forwarding import Header, describe_exception, describe_h11_error
from ssefan.http.responses import MAX_RESPONSE_HEAD

__all__ = [
    "Origin",
    "OriginClosed",
    "OriginConnection",
    "OriginProtocolError",
    "Reply",
    "connect",
    "connect_unix",
    "fetch",
    "split_url",
]


class OriginClosed(ConnectionError):
    """The origin closed or reset the connection.

    `early`: before sending any byte of a response to the current request. On a
    reused connection that is the keep-alive race (RFC 9112 §9.3.1): the
    request may never have been seen, so an idempotent one can be retried.
    """

    # `early` has a default so that copy.copy can rebuild it (flow.fresh).
    def __init__(self, message: str, early: bool = False) -> None:
        super().__init__(message)
        self.early = early


class OriginProtocolError(Exception):
    """The origin's bytes were not valid HTTP/1.1 (h11 refused them)."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where to connect for an http(s) URL, and the Host header it is asked by."""

    scheme: str
    host: str
    port: int
    host_header: str  # what a request without its own Host carries

    @classmethod
    def from_url(cls, url: str) -> Origin:
        return split_url(url)[0]

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}"


def split_url(url: str) -> tuple[Origin, str]:
    """An http(s) URL as its origin and its request target (origin-form, RFC 9112 §3.2.1).

    The one URL parser for every outgoing connection: the app, auth endpoints,
    upstreams. Raises ValueError for anything but an http(s) URL with a host.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default_port = 443 if parts.scheme == "https" else 80
    port = parts.port or default_port
    host = parts.hostname
    host_header = f"[{host}]" if ":" in host else host  # an IPv6 literal
    if port != default_port:
        host_header += f":{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, host, port, host_header), target


_NOTHING = memoryview(b"")


class Owner(Protocol):
    """Who keeps a connection while it is idle (a pool): told when it must go."""

    def discard(self, connection: OriginConnection) -> None: ...


class OriginConnection(asyncio.Protocol):
    """One connection to an origin, driven by one exchange at a time.

    With an `owner` (a pool) it may be parked between exchanges; without one
    it serves whoever opened it and is closed by them.
    """

    def __init__(self, owner: Owner | None = None) -> None:
        self.pool = owner
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.transport: asyncio.Transport | None = None
        self.requests = 0  # requests started on this connection; > 1 means reused
        self.lost = False
        self.idle = False
        self._inbox: Inbox | None = None
        self._gate = WriteGate()
        self._answered = False  # a byte of the current response arrived
        self._switched = False  # receive_raw took h11's leftover bytes after a 101
        self._unread = _NOTHING  # what a `read` with a limit left for the next one
        self._idle_timer: asyncio.TimerHandle | None = None
        self._closed: asyncio.Future[None] | None = None  # made by wait_closed

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._inbox = Inbox(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Nothing was asked: a stray response (or garbage) on an idle connection.
            self._discard()
            return
        self._answered = True
        assert self._inbox is not None
        self._inbox.put(data)

    def eof_received(self) -> bool:
        if self.idle:
            self._discard()
        elif self._inbox is not None:
            self._inbox.put_eof()
        return False  # nothing more can come: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        failure = OriginClosed(_describe_loss(exc), early=not self._answered)
        failure.__cause__ = exc
        if self._inbox is not None:
            self._inbox.fail(failure)
        self._gate.fail(failure)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self.idle:
            self._discard()

    def pause_writing(self) -> None:
        self._gate.pause()

    def resume_writing(self) -> None:
        self._gate.resume()

    # -- used by an exchange ------------------------------------------------------

    @property
    def reused(self) -> bool:
        return self.requests > 1

    @property
    def writing_paused(self) -> bool:
        return self._gate.paused

    def write(self, event: h11.Request | h11.Data | h11.EndOfMessage) -> None:
        """Frame `event` with h11 and write it (see `drain` for backpressure)."""
        if isinstance(event, h11.Request):
            self.requests += 1
        data = self.conn.send(event)
        if data:
            self.write_raw(data)

    async def drain(self) -> None:
        """Wait while the origin pushes back; raise OriginClosed if it is gone."""
        await self._gate.wait()

    def next_event(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """h11's next event from the bytes read so far; NEED_DATA: `read` more."""
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            # Sanitised: h11 quotes the offending line, which may be a Set-Cookie.
            raise OriginProtocolError(describe_h11_error(exc)) from None

    async def read(self, limit: int | None = None) -> int:
        """Hand h11 the origin's next bytes, waiting for some if none are
        buffered: everything that arrived meanwhile, or at most `limit` bytes
        of it (the rest is kept for the next read). Returns how many; 0 at
        EOF, which h11 is told too."""
        unread = self._unread
        if not unread:
            assert self._inbox is not None
            data = await self._inbox.get()
            if limit is None or len(data) <= limit:
                self.conn.receive_data(data)  # the common case: as it came, no copy
                return len(data)
            unread = memoryview(data)
        if limit is not None and len(unread) > limit:
            self._unread, unread = unread[limit:], unread[:limit]
        else:
            self._unread = _NOTHING
        self.conn.receive_data(bytes(unread))
        return len(unread)

    async def receive(self) -> h11.Event:
        """The next h11 event of the response, reading as needed."""
        while True:
            event = self.next_event()
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            if not await self.read() and not self._answered:
                raise OriginClosed("closed the connection without answering", early=True)

    async def receive_raw(self) -> bytes:
        """After a protocol switch: the next bytes from the origin (b"" at EOF)."""
        assert self._inbox is not None
        if not self._switched:
            # h11 keeps what followed the 101 head in the same read; hand it over once,
            # with whatever a limited `read` left unread.
            self._switched = True
            pending = bytes(self.conn.trailing_data[0]) + self._unread
            self._unread = _NOTHING
            if pending:
                return pending
        return await self._inbox.get()

    def write_raw(self, data: bytes) -> None:
        if self.lost or self.transport is None:
            raise OriginClosed("closed the connection", early=not self._answered)
        self.transport.write(data)

    def close(self) -> None:
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._cancel_idle_timer()
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Return once the connection is gone (after `close`, or the origin's)."""
        if self.lost or self.transport is None:
            return
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed)

    # -- pool bookkeeping ---------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    def can_be_reused(self) -> bool:
        conn = self.conn
        return (
            self.alive
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
            and self._inbox is not None
            and not self._inbox.pending  # bytes after the response: a confused origin
            and not self._unread
        )

    def park(self, idle_timeout: float) -> None:
        self.conn.start_next_cycle()
        self._answered = False
        self.idle = True
        self._idle_timer = asyncio.get_running_loop().call_later(idle_timeout, self._discard)

    def unpark(self) -> None:
        self.idle = False
        self._cancel_idle_timer()

    def _discard(self) -> None:
        if self.pool is not None:
            self.pool.discard(self)
        else:
            self.idle = False
            self.close()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


def _describe_loss(exc: Exception | None) -> str:
    if exc is None:
        return "closed the connection"
    return f"connection lost ({describe_exception(exc)})"


# -- opening connections ------------------------------------------------------------


async def connect(
    origin: Origin,
    *,
    connect_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    owner: Owner | None = None,
) -> OriginConnection:
    """A new connection to `origin` (TLS for https, verified by the system's CAs
    unless `ssl_context` says otherwise).

    Raises TimeoutError when TCP + TLS take longer than `connect_timeout`,
    OSError when the connect fails (refused, unreachable, name unknown, TLS).
    """
    if ssl_context is None and origin.scheme == "https":
        ssl_context = ssl.create_default_context()
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(connect_timeout):
        _, protocol = await loop.create_connection(
            lambda: OriginConnection(owner),
            origin.host,
            origin.port,
            ssl=ssl_context,
            server_hostname=origin.host if ssl_context is not None else None,
        )
    return protocol


async def connect_unix(address: str | bytes) -> OriginConnection:
    """A new connection to a Unix socket: a path, or b"\\0name" (Linux's abstract
    namespace, see ops.worker.unix_address). Raises OSError when the connect
    fails; the caller bounds its time (a local socket has no handshake)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        # Connected by hand: an abstract address is not a path every loop's
        # create_unix_connection takes.
        await loop.sock_connect(sock, address)
        _, protocol = await loop.create_unix_connection(OriginConnection, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


# -- one whole exchange ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole response: for small answers read at once (a worker's metrics)."""

    status: int
    reason: bytes
    headers: list[Header]
    body: bytes


async def fetch(
    connection: OriginConnection, request: h11.Request, *, max_body: int | None = None
) -> Reply:
    """Send `request` (without a body) and read the whole response.

    Raises OriginClosed, OriginProtocolError (also for a body over `max_body`
    bytes); the caller bounds the time and closes the connection.
    """
    connection.write(request)
    connection.write(h11.EndOfMessage())
    await connection.drain()
    event = await connection.receive()
    while isinstance(event, h11.InformationalResponse):
        event = await connection.receive()
    if not isinstance(event, h11.Response):
        raise OriginProtocolError(f"{type(event).__name__} before a response")
    body = bytearray()
    while True:
        part = await connection.receive()
        if isinstance(part, h11.EndOfMessage):
            break
        if not isinstance(part, h11.Data):
            raise OriginProtocolError(f"{type(part).__name__} in the body")
        body += part.data
        if max_body is not None and len(body) > max_body:
            raise OriginProtocolError(f"response body over {max_body} bytes")
    headers = [(bytes(name), bytes(value)) for name, value in event.headers.raw_items()]
    return Reply(event.status_code, bytes(event.reason), headers, bytes(body))
