"""One HTTP/2 stream as a transport: what a Subscriber and a pass-through write to.

A stream's Subscriber (stream.subscriber) writes to a transport and is told
`pause`/`resume`; this object is that transport for one HTTP/2 stream, so the
channel, its cursors and its lag rules are the same for both framings.

The hot path (finding 4 of the design notes): h2's `send_data` copies the
payload three times and costs ~4 µs per stream per event, so DATA is framed
here. Per stream and event only the 9-byte frame header is built; the payload
is the channel's one bytes object, queued beside it on the connection, which
writes every stream's frames of one loop step in one go. h2 keeps owning
HEADERS, END_STREAM, resets and the windows: the bytes sent here are taken off
its connection and stream windows exactly as `send_data` would (a unit test
compares the two), so its window arithmetic and WINDOW_UPDATE checks stay right.

Flow control: a frame goes out only while both windows hold it. What does not
fit is held here (`pending`) and the stream pauses: the Subscriber leaves the
live set exactly as a paused HTTP/1.1 transport does, and the lag rules count
`pending` as unsent. A WINDOW_UPDATE sends what is held, then the stream
resumes and catches up from the ring. Held bytes are at most one write (a
live batch or a catch-up slice) beyond the window, so a stream that never
opens its window costs one slice until the lag rules cut it off.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h11
from h11._util import Sentinel

from ssefan.edge.downstream import ClientGone
from ssefan.http.flow import WriteGate

if TYPE_CHECKING:
    from h2.stream import H2Stream as H2StreamState

    from ssefan.edge.http2 import HTTP2Connection
    from ssefan.stream.channel import Channel, Subscriber

__all__ = ["MIN_PARTIAL_FRAME", "H2Exchange", "H2Stream"]

# A DATA frame header: 24-bit length, type 0 (DATA), no flags, stream id.
_DATA_HEADER = struct.Struct(">HBBBL").pack
# The smallest part of a write sent into a window too small for all of it
# (CVE-2019-9511, "data dribble": tiny windows must not make tiny frames). A
# client whose window stays below this (and below the write) stalls, and the
# lag rules cut it off like any stalled client.
MIN_PARTIAL_FRAME = 4096


class H2Stream(asyncio.WriteTransport):
    """One client stream of an HTTP/2 connection, seen as a transport."""

    __slots__ = (
        "channel",
        "closed",
        "connection",
        "ending",
        "exchange",
        "head_only",
        "pending",
        "pending_bytes",
        "state",
        "stream_id",
        "subscriber",
        "task",
        "unwatch",
    )

    def __init__(self, connection: HTTP2Connection, stream_id: int) -> None:
        # No super().__init__(): it only makes the `_extra` dict, one per
        # stream, that get_extra_info below never reads.
        self.connection = connection
        self.stream_id = stream_id
        # h2's own record of the stream, for its outbound window.
        self.state: H2StreamState = connection.h2.streams[stream_id]
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.ending = False  # close() was called with bytes still held
        self.closed = False
        self.head_only = False
        self.subscriber: Subscriber | None = None
        self.channel: Channel | None = None
        self.exchange: H2Exchange | None = None
        self.task: asyncio.Task[None] | None = None
        self.unwatch: Callable[[], None] | None = None  # forward-auth revalidation

    # -- writing ------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        if self.pending:  # paused: keep order behind what is held
            self._hold(bytes(data))
            return
        size = len(data)
        connection = self.connection
        h2 = connection.h2
        state = self.state
        window = min(h2.outbound_flow_control_window, state.outbound_flow_control_window)
        if size <= window and size <= connection.frame_size:
            # The common case: one frame, the shared payload untouched.
            h2.outbound_flow_control_window -= size
            state.outbound_flow_control_window -= size
            connection.queue(_DATA_HEADER(size >> 8, size & 0xFF, 0, 0, self.stream_id), data)
            return
        self._write_framed(memoryview(data))

    def _write_framed(self, data: memoryview) -> None:
        """Frame `data` as far as the windows hold it; hold the rest and pause."""
        connection, h2, state = self.connection, self.connection.h2, self.state
        while data:
            window = min(h2.outbound_flow_control_window, state.outbound_flow_control_window)
            size = min(len(data), window, connection.frame_size)
            if size < len(data) and size < MIN_PARTIAL_FRAME:
                break
            h2.outbound_flow_control_window -= size
            state.outbound_flow_control_window -= size
            header = _DATA_HEADER(size >> 8, size & 0xFF, 0, 0, self.stream_id)
            connection.queue(header, data[:size].tobytes())
            data = data[size:]
        if data:
            self._hold(data.tobytes())

    def _hold(self, data: bytes) -> None:
        first = not self.pending
        self.pending.append(data)
        self.pending_bytes += len(data)
        if first:
            self.pause()

    def window_opened(self) -> None:
        """A WINDOW_UPDATE (this stream's or the connection's): send what is held."""
        if not self.pending or self.closed:
            return
        held, self.pending, self.pending_bytes = self.pending, [], 0
        for index, data in enumerate(held):
            self._write_framed(memoryview(data))
            if self.pending:  # still short: keep the rest behind it, in order
                rest = held[index + 1 :]
                self.pending.extend(rest)
                self.pending_bytes += sum(len(item) for item in rest)
                return
        if self.ending:
            self._end()
        elif not self.connection.writing_paused:
            self.resume()

    # -- what the subscriber or exchange is told ------------------------------------

    def pause(self) -> None:
        if self.subscriber is not None and self.channel is not None:
            self.channel.pause(self.subscriber)
        elif self.exchange is not None:
            self.exchange.gate.pause()

    def resume(self) -> None:
        """Both the stream's window and the connection's socket take bytes again."""
        if self.pending or self.closed:
            return
        if self.subscriber is not None and self.channel is not None:
            self.channel.resume(self.subscriber)
        elif self.exchange is not None:
            self.exchange.gate.resume()

    # -- asyncio.WriteTransport, as a Subscriber uses it ---------------------------

    def get_write_buffer_size(self) -> int:
        return self.pending_bytes

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """A stream pauses when its window is short, not at a buffer mark."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            # Subscriber.reset() sets SO_LINGER on the socket it gets: that
            # socket carries the other streams too.
            return default
        transport = self.connection.transport
        return default if transport is None else transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.closed or self.ending

    def close(self) -> None:
        """End the stream (END_STREAM) once what is held is sent."""
        if self.closed or self.ending:
            return
        if self.pending:
            self.ending = True
            return
        self._end()

    def abort(self) -> None:
        """Reset the stream (RST_STREAM CANCEL), dropping what is held."""
        if self.closed:
            return
        self.pending, self.pending_bytes = [], 0
        self.connection.reset_stream(self)

    def _end(self) -> None:
        self.connection.end_stream(self)

    def can_write_eof(self) -> bool:
        return False


class ExchangeState:
    """Where an exchange stands, in h11's terms (what proxy.Exchange reads of `conn`)."""

    __slots__ = ("our_state", "their_state")

    # proxy.Exchange relays 1xx only to b"1.1".
    their_http_version: bytes | None = b"2"

    def __init__(self, *, body_follows: bool) -> None:
        self.our_state: type[Sentinel] = h11.SEND_RESPONSE
        self.their_state: type[Sentinel] = h11.SEND_BODY if body_follows else h11.DONE


class H2Exchange:
    """A pass-through exchange's view of one HTTP/2 stream (a downstream.Downstream).

    The exchange speaks h11 events; this turns them into HEADERS and DATA on
    the stream. The request body arrives as DataReceived; its flow-control
    credit goes back to the client only when the exchange takes the bytes, so
    an upload is paced by the app (HTTP/2 windows do what pausing the socket
    does for HTTP/1.1).
    """

    __slots__ = (
        "_body",
        "_ended",
        "_error",
        "_waiter",
        "conn",
        "gate",
        "peer_ip",
        "scheme",
        "stream",
    )

    def __init__(self, stream: H2Stream, *, body_follows: bool, peer_ip: str) -> None:
        self.stream = stream
        self.conn = ExchangeState(body_follows=body_follows)
        self.peer_ip = peer_ip
        self.scheme = "https"
        self.gate = WriteGate()
        self._body: list[tuple[bytes, int]] = []
        self._ended = not body_follows
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- the request body, as the connection delivers it -----------------------------

    def body_received(self, data: bytes, credit: int) -> None:
        self._body.append((data, credit))
        self._wake()

    def body_ended(self) -> None:
        self._ended = True
        self._wake()

    def fail(self, exc: BaseException) -> int:
        """The stream is gone; returns the credit of the body left unread."""
        self._error = exc
        self.gate.fail(exc)
        self._wake()
        unread = sum(credit for _, credit in self._body)
        self._body.clear()
        return unread

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- downstream.Downstream -------------------------------------------------------

    @property
    def writing_paused(self) -> bool:
        # Paused from the first byte the window could not take, or while the
        # connection's socket pushes back: the exchange then waits in drain().
        return self.gate.paused

    @property
    def keep_alive(self) -> bool:
        return True  # HTTP/2: a drain sends GOAWAY on the connection instead

    async def receive(self) -> h11.Event:
        while True:
            if self._body:
                data, credit = self._body.pop(0)
                self.stream.connection.credit(self.stream, credit)
                return h11.Data(data=data)
            if self._error is not None:
                raise ConnectionResetError("the client reset the stream")
            if self._ended:
                self.conn.their_state = h11.DONE
                return h11.EndOfMessage()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def write(
        self, event: h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
    ) -> None:
        if self._error is not None or self.stream.closed:
            raise ConnectionResetError("the client reset the stream")
        if isinstance(event, h11.Response):
            headers = [(name, value) for name, value in event.headers]
            self.stream.connection.send_head(self.stream, event.status_code, headers)
            self.conn.our_state = h11.SEND_BODY
        elif isinstance(event, h11.Data):
            if not self.stream.head_only:
                self.stream.write(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            self.conn.our_state = h11.DONE
            self.stream.close()
        # 1xx: HTTP/2 could carry them, but proxy.Exchange relays them only to
        # HTTP/1.1 clients (their_http_version); a 101 can't happen (h2 refuses
        # the Upgrade header, RFC 9113 §8.2.2).

    async def drain(self) -> None:
        await self.gate.wait()

    async def receive_raw(self) -> bytes:
        raise ClientGone("HTTP/2 carries no tunnels")

    def write_raw(self, data: bytes) -> None:
        raise ConnectionResetError("HTTP/2 carries no raw bytes")

    def respond(
        self,
        status: int,
        body: str | bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        del close  # the stream ends; the connection carries on
        self.conn.our_state = h11.DONE
        self.stream.connection.respond(
            self.stream, status, body, headers, content_type=content_type
        )

    def close(self) -> None:
        self.stream.abort()

    def abort(self) -> None:
        self.stream.abort()
