"""HTTP/1.1 client connections to one origin (the app, or an auth endpoint), pooled.

A connection is an `asyncio.Protocol` over an h11 client whose reads and
writes a coroutine pulls and pushes (`receive`, `send`) with TCP backpressure
both ways (see flow.py). After a complete exchange that both sides left open,
it goes back to the pool; idle connections are closed after `idle_timeout`,
and the pool keeps at most `size` of them.

While a connection sits idle, the app may close it (its own keep-alive timeout)
or, worse, write a stray response (some servers send a 408 before closing).
Either marks it dead at once, so it is never handed out again: a stray byte
read as the next request's answer would be a mix-up between two clients.
A close that races with a new request is reported as `OriginClosed(early=True)`
so the caller can retry requests that are safe to repeat.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

import h11

from ssefan.http.flow import Inbox, WriteGate
from ssefan.http.forwarding import describe_exception, describe_h11_error
from ssefan.http.responses import MAX_RESPONSE_HEAD

__all__ = [
    "ConnectionPool",
    "Origin",
    "OriginClosed",
    "OriginConnection",
    "OriginProtocolError",
    "split_url",
]

log = logging.getLogger("ssefan.pool")


class OriginClosed(ConnectionError):
    """The origin closed or reset the connection.

    `early`: before sending any byte of a response to the current request. On a
    reused connection that is the keep-alive race (RFC 9112 §9.3.1): the
    request may never have been seen, so an idempotent one can be retried.
    """

    def __init__(self, message: str, *, early: bool) -> None:
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


class OriginConnection(asyncio.Protocol):
    """One keep-alive connection to an origin, driven by one exchange at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.transport: asyncio.Transport | None = None
        self.requests = 0  # requests started on this connection; > 1 means reused
        self.lost = False
        self.idle = False
        self._inbox: Inbox | None = None
        self._gate = WriteGate()
        self._answered = False  # a byte of the current response arrived
        self._switched = False  # receive_raw took h11's leftover bytes after a 101
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self._inbox = Inbox(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.idle:
            # Nothing was asked: a stray response (or garbage) on an idle connection.
            self.pool.discard(self)
            return
        self._answered = True
        assert self._inbox is not None
        self._inbox.put(data)

    def eof_received(self) -> bool:
        if self.idle:
            self.pool.discard(self)
        elif self._inbox is not None:
            self._inbox.put_eof()
        return False  # nothing more can come: let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        failure = OriginClosed(_describe_loss(exc), early=not self._answered)
        if self._inbox is not None:
            self._inbox.fail(failure)
        self._gate.fail(failure)
        if self.idle:
            self.pool.discard(self)

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

    async def receive(self) -> h11.Event:
        """The next h11 event of the response, reading as needed."""
        assert self._inbox is not None
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                # Sanitised: h11 quotes the offending line, which may be a Set-Cookie.
                raise OriginProtocolError(describe_h11_error(exc)) from None
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            data = await self._inbox.get()
            if not data and not self._answered:
                raise OriginClosed("closed the connection without answering", early=True)
            conn.receive_data(data)

    async def receive_raw(self) -> bytes:
        """After a protocol switch: the next bytes from the origin (b"" at EOF)."""
        assert self._inbox is not None
        if not self._switched:
            # h11 keeps what followed the 101 head in the same read; hand it over once.
            self._switched = True
            pending, _ = self.conn.trailing_data
            if pending:
                return bytes(pending)
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
        )

    def park(self, idle_timeout: float) -> None:
        self.conn.start_next_cycle()
        self._answered = False
        self.idle = True
        self._idle_timer = asyncio.get_running_loop().call_later(
            idle_timeout, self.pool.discard, self
        )

    def unpark(self) -> None:
        self.idle = False
        self._cancel_idle_timer()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


class ConnectionPool:
    """Keep-alive connections to one origin: at most `size` idle, each for `idle_timeout`."""

    def __init__(
        self, origin: Origin, *, size: int, idle_timeout: float, connect_timeout: float
    ) -> None:
        self.origin = origin
        self.size = size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: list[OriginConnection] = []  # most recently used last
        self._ssl = ssl.create_default_context() if origin.scheme == "https" else None
        self._closed = False
        # Counters (rendered by metrics).
        self.connects = 0
        self.reuses = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> OriginConnection:
        """An idle connection (most recently used first), or a new one.

        Raises TimeoutError when the connect takes longer than connect_timeout,
        OSError when it fails (refused, unreachable, TLS).
        """
        while self._idle and not fresh:
            connection = self._idle.pop()
            connection.unpark()
            if connection.alive:
                self.reuses += 1
                return connection
            connection.close()
        return await self._connect()

    async def _connect(self) -> OriginConnection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        async with asyncio.timeout(self.connect_timeout):
            _, protocol = await loop.create_connection(
                lambda: OriginConnection(self),
                origin.host,
                origin.port,
                ssl=self._ssl,
                server_hostname=origin.host if self._ssl is not None else None,
            )
        self.connects += 1
        return protocol

    def release(self, connection: OriginConnection) -> None:
        """Back to the pool if the exchange ended cleanly, else closed."""
        if self._closed or len(self._idle) >= self.size or not connection.can_be_reused():
            connection.close()
            return
        connection.park(self.idle_timeout)
        self._idle.append(connection)

    def discard(self, connection: OriginConnection) -> None:
        """An idle connection died, expired or misbehaved: forget and close it."""
        if connection in self._idle:
            self._idle.remove(connection)
        connection.idle = False
        connection.close()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.idle = False
            connection.close()


def _describe_loss(exc: Exception | None) -> str:
    if exc is None:
        return "closed the connection"
    return f"connection lost ({describe_exception(exc)})"
