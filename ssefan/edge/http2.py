"""The HTTP/2 adapter: an asyncio.Protocol over h2, and nothing but framing.

TLS's ALPN picks it (protocol.HTTPConnection hands the transport over in
`connection_made`). Every request goes the same way as over HTTP/1.1: the
target and Host are checked (request_checks), admission decides (a stream,
forward-auth first, an answer, or not a route: the fallback or the
pass-through), and this module only frames what it is told. Each stream is a
transport of its own (h2stream.H2Stream): a stream route's Subscriber writes
DATA frames to it, a pass-through exchange writes through an H2Exchange.

Writes of one loop step are collected and written to the socket at once: at
fan-out time every stream of a connection adds a 9-byte header and the shared
payload, and TLS encrypts the lot in one call rather than once per stream.

Limits (docs/http2.md): SETTINGS_MAX_CONCURRENT_STREAMS from
listen.http2.max_concurrent_streams, the header list size from
max_header_bytes (h2's HPACK decoder enforces it: the HPACK bomb), and h2's
cap of 64 CONTINUATION frames. What h2 does not limit is counted here (client
resets, PING, SETTINGS, empty DATA frames) with token buckets; a client over
one gets GOAWAY(ENHANCE_YOUR_CALM) and the connection closes. Every such close
is counted by reason. While the socket pushes back, reading pauses, so a
client that doesn't read can't pile up PING or SETTINGS acknowledgements.

Past 400 lines, knowingly: one connection's state (the h2 machine, its
streams, the write queue, the flood counters) read by every event handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import h11
from hyperframe.frame import GoAwayFrame

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
from ssefan.edge.h2stream import H2Exchange, H2Stream
from ssefan.http.request_checks import BadRequest, check_request
from ssefan.stream.channel import DisconnectReason, Subscriber

if TYPE_CHECKING:
    from ssefan.edge.server import Server

__all__ = ["FLOOD_LIMITS", "HTTP2Connection", "TokenBucket"]

_BODY_EVENTS = (h2.events.DataReceived, h2.events.StreamEnded)

# Seconds a connection whose GOAWAY and last stream end are sent stays open,
# reading, for the client to close it first (see _linger).
LINGER = 1.0

log = logging.getLogger("ssefan.server")

# Response headers that are HTTP/1.1's hop-by-hop framing (RFC 9113 §8.2.2):
# never sent on HTTP/2. h2 would strip most of them silently; stripping them
# here keeps the list in one place and covers proxy-connection too.
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)


class TokenBucket:
    """At most `burst` at once and `rate` per second after (nghttp2's rule for resets)."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, burst: float, rate: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.updated = time.monotonic()

    def take(self) -> bool:
        """Count one; False once the bucket is empty (the peer floods)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


# What a client may send per connection before it is taken for a flood:
# (burst, per second after). Resets as nghttp2 1.57 (CVE-2023-44487, rapid
# reset): every EventSource a page closes is one. PING and SETTINGS
# (CVE-2019-9512/9515): browsers send a handful per connection. Empty DATA
# frames without END_STREAM (CVE-2019-9518): no real client sends them.
FLOOD_LIMITS: dict[str, tuple[float, float]] = {
    "rapid_reset": (1000, 33),
    "ping_flood": (100, 10),
    "settings_flood": (100, 10),
    "empty_frames": (100, 10),
}


class HTTP2Connection(asyncio.Protocol):
    """One client connection speaking HTTP/2: many streams, one socket."""

    __slots__ = (
        "_buckets",
        "_flush_handle",
        "_goaway_sent",
        "_highest_stream",
        "_out",
        "_timer",
        "config",
        "frame_size",
        "h2",
        "peer",
        "peer_ip",
        "server",
        "streams",
        "transport",
        "writing_paused",
    )

    def __init__(self, server: Server, *, peer: str, peer_ip: str) -> None:
        self.server = server
        self.config = server.config
        self.peer = peer
        self.peer_ip = peer_ip
        self.transport: asyncio.Transport | None = None
        settings = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=settings)
        self.streams: dict[int, H2Stream] = {}
        self.frame_size = self.h2.max_outbound_frame_size
        self.writing_paused = False
        self._out: list[bytes | bytearray | memoryview] = []
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._goaway_sent = False
        self._highest_stream = 0
        self._buckets = {name: TokenBucket(*limit) for name, limit in FLOOD_LIMITS.items()}

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.server.count_http2("connections")
        h2conn = self.h2
        h2conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    self.config.listen.http2.max_concurrent_streams
                ),
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self.config.max_header_bytes,
                # RFC 8441's extended CONNECT (WebSocket over HTTP/2) stays
                # off: browsers then open their WebSockets over HTTP/1.1.
                h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 0,
            },
        )
        h2conn.initiate_connection()
        self._flush()
        self._arm_idle_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        self.server.connection_lost(self)
        gone = ConnectionResetError("the client closed the connection")
        for stream in list(self.streams.values()):
            self._stream_gone(stream, gone)
        self.streams.clear()
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        opened: list[tuple[H2Stream, h2.events.RequestReceived]] = []
        # The body (and end) of a request opened in this same read waits for
        # the request to be handled: only then is there an exchange to take it.
        waiting: set[int | None] = set()
        deferred: list[h2.events.Event] = []
        for event in events:
            if isinstance(event, _BODY_EVENTS) and event.stream_id in waiting:
                deferred.append(event)
            elif not self._handle(event, opened):
                return  # the connection is closing
            elif isinstance(event, h2.events.RequestReceived):
                waiting.add(event.stream_id)
        # Only now do requests cost anything (forward-auth, a channel): a
        # stream reset in the same read (rapid reset) never gets that far.
        for stream, request in opened:
            if not stream.closed:
                self._on_request(stream, request)
        for event in deferred:
            if not self._handle(event, opened):
                return
        self._flush()

    def eof_received(self) -> bool:
        return False  # close: HTTP/2 has no half-closed connections of use

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None:
            self.transport.pause_reading()  # no more PINGs to acknowledge meanwhile
        for stream in list(self.streams.values()):
            stream.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        for stream in list(self.streams.values()):
            stream.resume()

    # -- h2's events ------------------------------------------------------------------

    def _handle(
        self, event: h2.events.Event, opened: list[tuple[H2Stream, h2.events.RequestReceived]]
    ) -> bool:
        """Handle one event; False if the connection is being closed."""
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            if self._goaway_sent:
                # Opened after our GOAWAY named the last stream we take: the
                # client may send it elsewhere (RFC 9113 §6.8).
                self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return True
            self._highest_stream = max(self._highest_stream, event.stream_id)
            if event.stream_id not in self.h2.streams:
                return True  # reset in the same read, and h2 has let it go already
            self._cancel_timer()
            opening = H2Stream(self, event.stream_id)
            self.streams[event.stream_id] = opening
            opened.append((opening, event))
        elif isinstance(event, h2.events.DataReceived):
            return self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            ended = self._stream(event.stream_id)
            if ended is not None and ended.exchange is not None:
                ended.exchange.body_ended()
        elif isinstance(event, h2.events.StreamReset):
            reset = self._stream(event.stream_id)
            if reset is not None:
                self._stream_gone(reset, ConnectionResetError("the client reset the stream"))
                self._forget(reset)
            if event.remote_reset and not self._buckets["rapid_reset"].take():
                return self._flood("rapid_reset")
        elif isinstance(event, h2.events.WindowUpdated):
            self._window_updated(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.frame_size = self.h2.max_outbound_frame_size
            if not self._buckets["settings_flood"].take():
                return self._flood("settings_flood")
            if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
                self._window_updated(0)  # a larger initial window opens every stream
        elif isinstance(event, h2.events.PingReceived):
            if not self._buckets["ping_flood"].take():
                return self._flood("ping_flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()
            return False
        # Others (SettingsAcknowledged, PriorityUpdated, TrailersReceived,
        # UnknownFrameReceived, PingAckReceived) need nothing.
        return True

    def _on_data(self, event: h2.events.DataReceived) -> bool:
        sid = event.stream_id
        assert event.data is not None
        credit = event.flow_controlled_length or 0
        empty = not event.data and not event.stream_ended
        if empty and not self._buckets["empty_frames"].take():
            return self._flood("empty_frames")
        stream = self._stream(sid)
        if stream is not None and stream.exchange is not None:
            # Credit goes back when the exchange takes the bytes (H2Exchange.receive).
            stream.exchange.body_received(event.data, credit)
            return True
        # A body nobody reads (a stream route, an answered request): dropped,
        # and its credit returned at once so the connection's window stays open.
        if credit:
            self.h2.acknowledge_received_data(credit, sid)
        return True

    def _window_updated(self, stream_id: int | None) -> None:
        if stream_id:
            stream = self._stream(stream_id)
            if stream is not None:
                stream.window_opened()
        else:
            for stream in list(self.streams.values()):
                stream.window_opened()

    def _stream(self, stream_id: int | None) -> H2Stream | None:
        return None if stream_id is None else self.streams.get(stream_id)

    # -- requests ---------------------------------------------------------------------

    def _on_request(self, stream: H2Stream, event: h2.events.RequestReceived) -> None:
        pseudo: dict[bytes, bytes] = {}
        headers: list[tuple[bytes, bytes]] = []
        cookies: list[bytes] = []
        for name, value in event.headers or ():
            name, value = bytes(name), bytes(value)
            if name.startswith(b":"):
                pseudo[name] = value
            elif name == b"cookie":
                cookies.append(value)  # RFC 9113 §8.2.3: crumbs, joined below
            else:
                headers.append((name, value))
        if cookies:
            headers.append((b"cookie", b"; ".join(cookies)))
        method, target = pseudo.get(b":method", b""), pseudo.get(b":path", b"")
        authority = pseudo.get(b":authority")
        if authority is not None:
            hosts = [value for name, value in headers if name == b"host"]
            if any(host != authority for host in hosts):
                # RFC 9113 §8.3.1: the two must name the same origin.
                self._bad_request(stream, BadRequest(400, ":authority and Host differ"))
                return
            headers = [(b"host", authority), *((n, v) for n, v in headers if n != b"host")]
        body_follows = not event.stream_ended
        stream.head_only = method == b"HEAD"
        checked = check_request(method, target, b"1.1", headers)
        if isinstance(checked, BadRequest):
            self._bad_request(stream, checked)
            return
        incoming = Incoming(method, checked, headers, self.peer, self.peer_ip, "https")
        admission = admit(self.server, incoming)
        if isinstance(admission, NotARoute):
            self._not_a_route(stream, admission, method, target, headers, body_follows)
        elif isinstance(admission, Authorize):
            self._start(stream, self._authorize(stream, admission))
        elif isinstance(admission, OpenStream):
            self._open_stream(stream, admission)
        else:
            self._answer(stream, admission)

    def _not_a_route(
        self,
        stream: H2Stream,
        admission: NotARoute,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body_follows: bool,
    ) -> None:
        server = self.server
        if server.fallback is None and server.pass_through is None:
            self._answer(stream, admission.answer)
            return
        if body_follows and not any(name == b"content-length" for name, _ in headers):
            # The app speaks HTTP/1.1: a body of unknown length goes chunked.
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        try:
            request = h11.Request(method=method, target=target, headers=headers)
        except h11.LocalProtocolError as exc:
            self._bad_request(stream, BadRequest(400, f"request can't be forwarded: {exc}"))
            return
        exchange = H2Exchange(stream, body_follows=body_follows, peer_ip=self.peer_ip)
        stream.exchange = exchange
        if server.fallback is not None and server.fallback(exchange, request):
            return
        if server.pass_through is not None:
            checked = check_request(method, target, b"1.1", headers)
            assert not isinstance(checked, BadRequest)  # it passed above
            self._start(stream, server.pass_through(exchange, request, checked))
            return
        stream.exchange = None
        self._answer(stream, admission.answer)

    def _bad_request(self, stream: H2Stream, bad: BadRequest) -> None:
        self.server.count_refusal(bad.status)
        log.info(
            "peer=%s stream=%d bad request (%d): %s",
            self.peer,
            stream.stream_id,
            bad.status,
            bad.reason,
        )
        self.respond(stream, bad.status, f"{bad.status} {bad.reason}\n")

    def _start(self, stream: H2Stream, work: object) -> None:
        assert asyncio.iscoroutine(work)
        task = asyncio.get_running_loop().create_task(work)
        stream.task = task
        task.add_done_callback(lambda done: self._task_done(stream, done))

    def _task_done(self, stream: H2Stream, task: asyncio.Task[None]) -> None:
        stream.task = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("peer=%s request failed unexpectedly", self.peer, exc_info=exc)
            stream.abort()
        elif stream.exchange is not None and stream.exchange.conn.our_state is not h11.DONE:
            stream.abort()  # the exchange ended without a whole answer
        self._flush()

    async def _authorize(self, stream: H2Stream, asked: Authorize) -> None:
        """Ask forward-auth, then open the stream (or answer) in one synchronous step."""
        decision: AuthDecision | None
        try:
            decision = await asked.auth.decide(asked.credential)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # the stream itself went away
            decision = None  # the ask was cancelled under us: its ForwardAuth closed
        if stream.closed:
            return
        outcome = after_auth(self.server, asked, decision)
        if isinstance(outcome, Answer):
            self._answer(stream, outcome)
            return
        self._open_stream(stream, outcome)
        if stream.subscriber is not None and asked.auth.config.revalidate is not None:
            stream.unwatch = asked.auth.watch(
                asked.credential, lambda: self._credential_revoked(stream)
            )

    def _credential_revoked(self, stream: H2Stream) -> None:
        if stream.subscriber is not None and stream.channel is not None:
            stream.channel.end_stream(stream.subscriber, DisconnectReason.REVOKED)

    def _open_stream(self, stream: H2Stream, opening: OpenStream) -> None:
        headers = STREAM_HEADERS + opening.cors_headers
        if stream.head_only or opening.channel is None:
            self.send_head(stream, 200, headers, end_stream=True)
            return
        self.send_head(stream, 200, headers)
        channel = opening.channel
        subscriber = Subscriber(stream, chunked=False, on_close=lambda _: self._unwatch(stream))
        first = OPENING_COMMENT
        if channel.route.retry is not None:
            first += encode_retry(channel.route.retry)
        subscriber.send(first)
        stream.subscriber, stream.channel = subscriber, channel
        channel.subscribe(subscriber, opening.last_event_id)
        if self.writing_paused and not subscriber.closed:
            channel.pause(subscriber)  # the socket pushes back: it catches up later

    @staticmethod
    def _unwatch(stream: H2Stream) -> None:
        if stream.unwatch is not None:
            unwatch, stream.unwatch = stream.unwatch, None
            unwatch()

    # -- framing --------------------------------------------------------------------

    def send_head(
        self,
        stream: H2Stream,
        status: int,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = False,
    ) -> None:
        block = [(b":status", b"%d" % status)]
        block += [
            (name.lower(), value) for name, value in headers if name.lower() not in _HOP_BY_HOP
        ]
        try:
            self.h2.send_headers(stream.stream_id, block, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            # The stream closed meanwhile (a reset h2 knows of): nothing to send.
            stream.closed = True
            self._forget(stream)
            return
        self._take_h2()
        if end_stream:
            stream.closed = True
            self._forget(stream)

    def respond(
        self,
        stream: H2Stream,
        status: int,
        body: str | bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """A complete response on `stream`: HEADERS, the body, END_STREAM."""
        payload = body.encode("utf-8") if isinstance(body, str) else body
        all_headers = list(headers or [])
        if status != 204:
            all_headers += [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(payload)),
            ]
        if not payload or stream.head_only:
            self.send_head(stream, status, all_headers, end_stream=True)
            return
        self.send_head(stream, status, all_headers)
        stream.write(payload)
        stream.close()

    def _answer(self, stream: H2Stream, answer: Answer) -> None:
        self.respond(
            stream, answer.status, answer.body, answer.headers, content_type=answer.content_type
        )

    def queue(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        """A hand-framed DATA frame (h2stream.H2Stream), written with this step's others."""
        out = self._out
        out.append(header)
        out.append(payload)
        if self._flush_handle is None and self.transport is not None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _take_h2(self) -> None:
        """Queue what h2 has framed (HEADERS, END_STREAM, resets, ACKs) in order."""
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
            if self._flush_handle is None and self.transport is not None:
                self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        data = self.h2.data_to_send()
        if data:
            self._out.append(data)
        out = self._out
        if not out or self.transport is None:
            return
        self._out = []
        # Joined: the TLS transports (asyncio's and uvloop's) make one TLS
        # record, and one encrypt call, per buffer given to writelines, so
        # 9-byte headers each in their own record would cost more than the copy.
        self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def end_stream(self, stream: H2Stream) -> None:
        """END_STREAM on a stream whose bytes are all sent (H2Stream.close)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # reset meanwhile
            self.h2.end_stream(stream.stream_id)
        stream.closed = True
        self._forget(stream)
        self._take_h2()

    def reset_stream(self, stream: H2Stream) -> None:
        """RST_STREAM(CANCEL): a stream cut off (too slow) or an exchange aborted."""
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed meanwhile
            self.h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
        self.server.count_http2("resets_sent")
        self._stream_gone(stream, ConnectionResetError("the stream was reset"))
        self._forget(stream)
        self._take_h2()

    def credit(self, stream: H2Stream, size: int) -> None:
        """Give the client back `size` bytes of window (a body the exchange took)."""
        # Also once the stream is closed: the connection's window must not
        # shrink by what a reset upload left unread (h2 skips the stream's).
        if size and self.transport is not None and not self.transport.is_closing():
            self.h2.acknowledge_received_data(size, stream.stream_id)
            self._take_h2()

    # -- streams going away ----------------------------------------------------------

    def _stream_gone(self, stream: H2Stream, why: BaseException) -> None:
        """The stream ended abnormally: its subscriber, task or exchange stops."""
        stream.closed = True
        stream.pending, stream.pending_bytes = [], 0
        if stream.subscriber is not None and stream.channel is not None:
            stream.channel.unsubscribe(stream.subscriber)
        if stream.exchange is not None:
            self.credit(stream, stream.exchange.fail(why))
        if stream.task is not None:
            stream.task.cancel()
        self._unwatch(stream)

    def _forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            if self._goaway_sent:
                self._linger()
            else:
                self._arm_idle_timer()

    # -- closing ---------------------------------------------------------------------

    def close_if_idle(self) -> bool:
        """A drain: no new streams on this connection (GOAWAY); close it once its
        streams have ended. True if it closed now (it had none)."""
        if self.transport is None or self._goaway_sent:
            return False
        self._goaway_sent = True
        self.server.count_http2("goaway_drain")
        # Hand-framed, so that h2 still lets the open streams finish (its own
        # close_connection() ends all sending); RFC 9113 §6.8.
        frame = GoAwayFrame(stream_id=0)
        frame.last_stream_id = self._highest_stream
        frame.error_code = h2.errors.ErrorCodes.NO_ERROR
        self._out.append(frame.serialize())
        self._flush()
        if not self.streams:
            self._linger()
            return True
        return False

    def _linger(self) -> None:
        """After a GOAWAY, the last stream gone: close once the client has read it.

        The client closes when it has seen GOAWAY and its streams' ends; until
        then, or LINGER seconds, we keep reading. Closing at once would leave
        its WINDOW_UPDATEs unread, and a socket closed with unread bytes sends
        RST, which can destroy the END_STREAMs still in the client's buffer.
        """
        self._flush()
        self._cancel_timer()
        if self.transport is not None:
            self._timer = asyncio.get_running_loop().call_later(LINGER, self._close)

    def close(self) -> None:
        self._close()

    def _flood(self, kind: str) -> bool:
        log.warning(
            "peer=%s HTTP/2 %s (over %g at once, %g/s): GOAWAY(ENHANCE_YOUR_CALM), closing",
            self.peer,
            kind.replace("_", " "),
            *FLOOD_LIMITS[kind],
        )
        self._goaway(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, kind)
        return False

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """h2 refused what the client sent; it has already framed its GOAWAY."""
        kind = type(exc).__name__
        reason = {
            "TooManyStreamsError": "too_many_streams",
            "DenialOfServiceError": "header_flood",
            "FrameTooLargeError": "frame_too_large",
        }.get(kind, "protocol_error")
        # h2's messages name frames and settings, never header values.
        log.info("peer=%s HTTP/2 %s: %s; closing", self.peer, reason.replace("_", " "), exc)
        self.server.count_http2(f"goaway_{reason}")
        self._flush()
        self._close()

    def _goaway(self, code: h2.errors.ErrorCodes, reason: str) -> None:
        self.server.count_http2(f"goaway_{reason}")
        with contextlib.suppress(h2.exceptions.ProtocolError):  # closed already
            self.h2.close_connection(error_code=code, last_stream_id=self._highest_stream)
        self._flush()
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._flush()
            transport.close()

    # -- the idle timer ---------------------------------------------------------------

    def _arm_idle_timer(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.config.keepalive_timeout, self._idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _idle(self) -> None:
        self._timer = None
        if not self.streams:
            self._goaway(h2.errors.ErrorCodes.NO_ERROR, "idle")
