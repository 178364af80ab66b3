"""The HTTP/1.1 adapter: an asyncio.Protocol over h11, and nothing but framing.

h11 parses requests and frames ordinary responses (keep-alive included). What
a request gets is decided elsewhere, as a value (admission.py): this module
reads, checks the framing, asks, and writes what it is told. For a stream,
h11 writes the response head and then steps aside: the body is written
straight to the transport by the channel, so the per-client cost of an event
is one `transport.write` of bytes framed once for everybody.

A connection is in one `Mode` at a time. Two things need to await before
they can answer: a pass-through exchange with the app, and forward-auth
before a stream opens. For those the connection is HANDED_OFF to a task:
bytes the client sends go to a bounded inbox the task pulls from (reading
pauses when it is full), and the task waits on `pause_writing` through a
write gate (flow.py). When the task ends, the connection goes back to
READING (keep-alive), is STREAMING, or closes.

Past 400 lines, knowingly: one asyncio.Protocol's state (the h11 machine,
the mode, the timer, the inbox and write gate of a hand-off) read by every
method: reading requests, handing off and back, and the Downstream methods a
pass-through exchange drives. Decisions are in admission.py, the exchange in
proxy.py.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

import h11

from ssefan.core.refusal import OPENING_COMMENT
from ssefan.core.sse import encode_retry
from ssefan.edge.admission import (
    STREAM_HEADERS,
    Answer,
    Authorize,
    Incoming,
    NotARoute,
    OpenStream,
    admit,
    after_auth,
)
from ssefan.edge.auth import AuthDecision
from ssefan.edge.http2 import HTTP2Connection
from ssefan.http.flow import Inbox, WriteGate
from ssefan.http.forwarding import describe_h11_error
from ssefan.http.request_checks import BadRequest, check_request
from ssefan.http.responses import raw_response, response_head
from ssefan.stream.channel import Channel, DisconnectReason, Subscriber

if TYPE_CHECKING:
    from ssefan.edge.server import Server

__all__ = ["HTTPConnection", "Mode"]

log = logging.getLogger("ssefan.server")

# RFC 9112 §9.6: after answering a request whose body was not read (413, a
# failed upload), close the write side and read (and drop) for this long
# before closing, or the unread bytes make the kernel send a reset that can
# destroy the answer before the client reads it. 2 s covers a loopback or LAN
# client's in-flight data; a client still sending after that is cut.
LINGER_SECONDS = 2.0

_BETWEEN_REQUESTS = frozenset({(h11.IDLE, h11.IDLE), (h11.DONE, h11.DONE)})


class Mode(enum.Enum):
    """What a connection is doing; each mode says who reads the client's bytes."""

    READING = "reading"  # h11 parses requests (keep-alive between them)
    HANDED_OFF = "handed_off"  # a task owns the connection: bytes go to its inbox
    TUNNEL = "tunnel"  # handed off after a protocol switch (101): raw bytes
    STREAMING = "streaming"  # an event stream: the client has nothing more to say
    CLOSING = "closing"  # closing or lingering: whatever arrives is dropped
    CLOSED = "closed"  # the transport is gone


# Modes in which a task owns the connection.
_HANDED_OFF = frozenset({Mode.HANDED_OFF, Mode.TUNNEL})


def _head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers as sent, less optional whitespace."""
    size = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n\r\n")
    for name, value in request.headers.raw_items():
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _has_both_framings(request: h11.Request) -> bool:
    names = {name for name, _ in request.headers}
    return b"content-length" in names and b"transfer-encoding" in names


class HTTPConnection(asyncio.Protocol):
    """One client connection: ordinary requests, or one stream until it ends."""

    # Slots: an idle stream costs this object plus a transport, thousands of times.
    __slots__ = (
        "_gate",
        "_head_only",
        "_inbox",
        "_task",
        "_timer",
        "_unwatch",
        "channel",
        "config",
        "conn",
        "mode",
        "peer",
        "peer_ip",
        "scheme",
        "server",
        "subscriber",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.config.max_header_bytes
        )
        self.mode = Mode.READING
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_ip = ""
        self.scheme = "http"
        self.subscriber: Subscriber | None = None
        self.channel: Channel | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head_only = False  # the current request is HEAD: no body may follow
        # While a task (pass-through or forward-auth) owns the connection.
        self._task: asyncio.Task[None] | None = None
        self._inbox: Inbox | None = None
        self._gate = WriteGate()
        self._unwatch: Callable[[], None] | None = None  # stop forward-auth revalidation

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_ip = str(peer[0])
        if self.transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
            ssl_object = self.transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                # ALPN chose HTTP/2 in the handshake: the other adapter takes over.
                http2 = HTTP2Connection(self.server, peer=self.peer, peer_ip=self.peer_ip)
                self.mode = Mode.CLOSED  # this object is done with
                self.transport.set_protocol(http2)
                http2.connection_made(self.transport)
                self.transport = None
                return
        self.server.connections.add(self)
        self._arm_timer(self.config.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mode = Mode.CLOSED
        self._cancel_timer()
        self.server.connection_lost(self)
        if self.subscriber is not None and self.channel is not None:
            self.channel.unsubscribe(self.subscriber)
        gone = ConnectionResetError("the client closed the connection")
        self._gate.fail(gone)
        if self._inbox is not None:
            self._inbox.fail(gone)
        if self._task is not None:
            self._task.cancel()  # nobody to answer: stop the exchange with the app

    def data_received(self, data: bytes) -> None:
        mode = self.mode
        if mode is Mode.READING:
            self.conn.receive_data(data)
            self._process()
        elif mode in _HANDED_OFF:
            assert self._inbox is not None
            self._inbox.put(data)  # a task owns the connection: it pulls
        # STREAMING: a stream's client has nothing more to say; anything it
        # pipelines is dropped, never buffered. CLOSING: likewise.

    def eof_received(self) -> bool:
        mode = self.mode
        if mode in _HANDED_OFF:
            assert self._inbox is not None
            self._inbox.put_eof()
            return True  # half-closed: the task may still answer
        if mode is Mode.READING:
            self.conn.receive_data(b"")
            self._process()
        return False  # let asyncio close the transport

    def pause_writing(self) -> None:
        if self.subscriber is not None and self.channel is not None:
            self.channel.pause(self.subscriber)
        else:
            self._gate.pause()

    def resume_writing(self) -> None:
        if self.subscriber is not None and self.channel is not None:
            self.channel.resume(self.subscriber)
        else:
            self._gate.resume()

    # -- request handling ---------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        while self._reading():
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if conn.their_state is h11.SEND_BODY and conn.our_state in (
                    h11.DONE,
                    h11.MUST_CLOSE,
                ):
                    # Answered at the head (404, 405, 403, a preflight) while the
                    # body is still coming. Nothing would bound how slowly it
                    # comes: close, lingering so the answer isn't lost to a reset.
                    self._close_lingering()
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    self._arm_timer(self.config.keepalive_timeout)
                    continue
                return
            if isinstance(event, h11.Request):
                self._cancel_timer()
                self._on_request(event)
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return
            if not self._reading():
                return  # streaming, handed off or closing: h11 is done for now
            # Data / EndOfMessage of a request body we already answered: dropped.
            if conn.our_state is h11.MUST_CLOSE:
                if conn.their_state is h11.SEND_BODY:
                    self._close_lingering()  # the unread body must not reset the answer
                else:
                    self._close()
                return

    def _reading(self) -> bool:
        # A method, not an inline test: handling a request changes the mode.
        return self.mode is Mode.READING

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        self.server.count_refusal(status)
        # h11 quotes the offending line, which may be a Cookie or Authorization
        # header: neither the log nor the answer repeats it.
        problem = describe_h11_error(exc)
        log.info("peer=%s bad request (%d): %s", self.peer, status, problem)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            reason = "request head too large" if status == 431 else "malformed request"
            self._write(raw_response(status, f"{status} {reason}: {problem}\n"))
        self._close()

    def _on_request(self, request: h11.Request) -> None:
        self._head_only = request.method == b"HEAD"
        size = _head_size(request)
        if size > self.config.max_header_bytes:
            # h11 applies max_incomplete_event_size only to a head still incomplete
            # after a read; a larger head that arrives whole in one read gets here.
            self.server.count_refusal(431)
            log.info("peer=%s bad request (431): request head of %d bytes", self.peer, size)
            self.respond(431, "431 request head too large\n", close=True)
            return
        headers = request.headers.raw_items()
        checked = check_request(request.method, request.target, request.http_version, headers)
        if isinstance(checked, BadRequest):
            self._bad_request(checked)
            return
        if _has_both_framings(request):
            # RFC 9112 §6.1: such a message "ought to be handled as an error";
            # the two framings are how requests are smuggled past a proxy that
            # reads one and an app that reads the other. h11 would go by
            # Transfer-Encoding and keep the connection: refuse, and close it.
            self._bad_request(
                BadRequest(
                    400,
                    "request has both Content-Length and Transfer-Encoding"
                    " (a request-smuggling pattern)",
                ),
                answer="400 request has both Content-Length and Transfer-Encoding\n",
            )
            return
        incoming = Incoming(request.method, checked, headers, self.peer, self.peer_ip, self.scheme)
        admission = admit(self.server, incoming)
        if isinstance(admission, NotARoute):
            server = self.server
            if server.fallback is not None and server.fallback(self, request):
                return
            if server.pass_through is not None:
                self._hand_off(server.pass_through(self, request, checked))
                return
            self._answer(admission.answer)
        elif isinstance(admission, Authorize):
            self._hand_off(self._authorize(admission))
        elif isinstance(admission, OpenStream):
            self._open_stream(admission)
        else:
            self._answer(admission)

    def _bad_request(self, bad: BadRequest, answer: str | None = None) -> None:
        """Refuse a request at the door, and close: a client that sends one such
        request may well send more, or a tunnel's (or HTTP/2's) bytes next."""
        self.server.count_refusal(bad.status)
        # The reason, never the target or a header: either may carry a token.
        log.info(
            "peer=%s bad request (%d): %s; closing the connection",
            self.peer,
            bad.status,
            bad.reason,
        )
        self.respond(bad.status, answer or f"{bad.status} {bad.reason}\n", close=True)

    async def _authorize(self, asked: Authorize) -> None:
        """Ask forward-auth, then open the stream (or answer) in one synchronous step."""
        decision: AuthDecision | None
        try:
            decision = await asked.auth.decide(asked.credential)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this exchange itself was cancelled: the client is gone
            decision = None  # the ask was cancelled under us: its ForwardAuth closed
        if self.mode is Mode.CLOSED:
            return
        # No await from here on: the capacity re-check, the head and the
        # subscribe (replay + going live) happen in this one event-loop step.
        outcome = after_auth(self.server, asked, decision)
        if isinstance(outcome, Answer):
            self._answer(outcome)
            return
        self._open_stream(outcome)
        if self.mode is Mode.STREAMING and asked.auth.config.revalidate is not None:
            self._unwatch = asked.auth.watch(asked.credential, self._credential_revoked)

    def _credential_revoked(self) -> None:
        """Forward-auth no longer admits this stream's credential: end it cleanly."""
        if self.subscriber is not None and self.channel is not None:
            self.channel.end_stream(self.subscriber, DisconnectReason.REVOKED)

    def _open_stream(self, stream: OpenStream) -> None:
        headers = STREAM_HEADERS + stream.cors_headers
        conn = self.conn
        if self._head_only:
            self._write(conn.send(response_head(200, headers)))
            self._write(conn.send(h11.EndOfMessage()))
            return
        head = conn.send(response_head(200, headers))
        assert self.transport is not None and stream.channel is not None
        channel = stream.channel
        chunked = conn.their_http_version == b"1.1"
        subscriber = Subscriber(self.transport, chunked=chunked, on_close=self._stream_closed)
        opening = OPENING_COMMENT
        if channel.route.retry is not None:
            opening += encode_retry(channel.route.retry)
        self._write(head)
        subscriber.send(opening)
        self.subscriber, self.channel = subscriber, channel
        self.mode = Mode.STREAMING
        # A stream never parses or frames through h11 again (nothing reads
        # `conn` outside READING and the hand-off); its parser state is ~2 KB
        # that an idle stream would otherwise carry. Deleting it, rather than
        # sharing a placeholder, makes any stray use fail loudly.
        del self.conn
        channel.subscribe(subscriber, stream.last_event_id)

    def _stream_closed(self, reason: DisconnectReason) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    # -- hand-off: a task owns the connection until it is done ---------------------

    def _hand_off(self, work: Coroutine[Any, Any, None]) -> None:
        assert self.transport is not None
        self.mode = Mode.HANDED_OFF
        self._inbox = Inbox(self.transport)
        self._task = asyncio.get_running_loop().create_task(work)
        self._task.add_done_callback(self._handed_back)

    def _handed_back(self, task: asyncio.Task[None]) -> None:
        self._task = None
        inbox, self._inbox = self._inbox, None
        assert inbox is not None
        pending, at_eof = inbox.take(), inbox.at_eof  # take() also resumes reading
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("peer=%s request failed unexpectedly", self.peer, exc_info=exc)
            self.abort()
            return
        mode = self.mode
        if mode in (Mode.CLOSED, Mode.CLOSING):
            return
        if mode is Mode.STREAMING:
            # It drops whatever the client sends, and ends as any stream does
            # when the client has closed its side.
            if at_eof and self.transport is not None:
                self.transport.close()
            return
        conn = self.conn
        if conn.their_state is h11.SEND_BODY and conn.our_state in (h11.DONE, h11.MUST_CLOSE):
            self._close_lingering()  # answered without reading the whole body
            return
        if (
            mode is Mode.TUNNEL
            or conn.our_state is not h11.DONE
            or (conn.their_state is not h11.DONE)
        ):
            # An upgraded tunnel, an aborted answer: the connection can't carry
            # another request.
            self._close()
            return
        self.mode = Mode.READING
        # Pipelined bytes that arrived meanwhile are the next request.
        if pending:
            conn.receive_data(pending)
        if at_eof:
            conn.receive_data(b"")
        self._process()

    # -- proxy.Downstream: the pass-through exchange's view of this connection --------

    @property
    def writing_paused(self) -> bool:
        return self._gate.paused

    @property
    def keep_alive(self) -> bool:
        """False during a drain: a pass-through response then closes the
        connection, so no browser reuses it into a process that is leaving."""
        return not self.server.draining

    async def receive(self) -> h11.Event:
        """The next event of the request body, reading from the client as needed."""
        assert self._inbox is not None
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            conn.receive_data(await self._inbox.get())

    def write(
        self, event: h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
    ) -> None:
        data = self.conn.send(event)
        if data:
            self.write_raw(data)

    async def drain(self) -> None:
        await self._gate.wait()

    async def receive_raw(self) -> bytes:
        """After a protocol switch: the client's next bytes (b"" at EOF)."""
        assert self._inbox is not None
        if self.mode is Mode.HANDED_OFF:
            # What followed the upgrade request in the same read, handed over once.
            self.mode = Mode.TUNNEL
            pending, _ = self.conn.trailing_data
            if pending:
                return bytes(pending)
        return await self._inbox.get()

    def write_raw(self, data: bytes) -> None:
        if self.mode is Mode.CLOSED or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    def close(self) -> None:
        self._close()

    def close_if_idle(self) -> bool:
        """Close a keep-alive connection that is between requests (a drain).

        A request that a browser sends on a reused connection that closes
        before any response byte is resent on a fresh one (Chromium and
        Firefox both; RFC 9110 §9.2.2 allows it for GET), so closing idle
        connections first means no EventSource of theirs meets this process
        again. Returns True if it closed.
        """
        if self.mode is not Mode.READING:
            return False
        conn = self.conn
        # Between requests is IDLE/IDLE, or DONE/DONE before h11 starts the
        # next cycle (that happens on the next read).
        between = (conn.their_state, conn.our_state) in _BETWEEN_REQUESTS
        if not between or conn.trailing_data[0]:
            return False  # a request is arriving: it gets its (drain) answer
        self._close()
        return True

    def abort(self) -> None:
        self._stop_reading()
        if self.transport is not None:
            self.transport.abort()

    # -- writing ------------------------------------------------------------------

    def _answer(self, answer: Answer) -> None:
        self.respond(
            answer.status,
            answer.body,
            answer.headers,
            close=answer.close,
            content_type=answer.content_type,
        )

    def respond(
        self,
        status: int,
        body: str | bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """Send a complete, Content-Length-framed response (keep-alive aware)."""
        payload = body.encode("utf-8") if isinstance(body, str) else body
        all_headers = list(headers or [])
        if status != 204:
            all_headers += [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(payload)),
            ]
        if close:
            all_headers.append((b"connection", b"close"))
        conn = self.conn
        out = conn.send(response_head(status, all_headers))
        if payload and not self._head_only:
            out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        self._write(out)

    def _write(self, data: bytes | None) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _close_lingering(self) -> None:
        """Half-close, drop what the client still sends, close after LINGER_SECONDS."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        self._stop_reading()  # data_received drops everything from now on
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def _close(self) -> None:
        self._stop_reading()
        if self.transport is not None:
            self.transport.close()

    def _stop_reading(self) -> None:
        if self.mode is not Mode.CLOSED:
            self.mode = Mode.CLOSING
        self._cancel_timer()

    # -- timers -------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.mode is not Mode.READING:
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._close()  # idle keep-alive connection: nothing to say
            return
        self.server.count_refusal(408)
        self._write(raw_response(408, "408 request head not received in time\n"))
        self._close()
