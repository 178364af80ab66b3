"""The hand-framed DATA path (edge/h2stream.py) against h2's own, in memory.

ssefan writes DATA frames itself (a 9-byte header and the shared payload) and
takes the bytes off h2's connection and stream windows as `send_data` would.
These tests keep that honest: the bytes on the wire and both windows match
what h2's `send_data` produces from the same state, a real h2 client parses
them, and WINDOW_UPDATEs release held bytes in order, never as a frame
smaller than MIN_PARTIAL_FRAME. Also the flood token bucket, on a clock the
test moves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import pytest

from ssefan.config import parse_config
from ssefan.edge.h2stream import MIN_PARTIAL_FRAME, H2Stream
from ssefan.edge.http2 import HTTP2Connection, TokenBucket
from ssefan.edge.server import Server

CONFIG = (
    "listen: 127.0.0.1:0\nroutes:\n  - path: /events\n    upstream: http://127.0.0.1:9/events\n"
)
REQUEST = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"t"), (b":path", b"/x")]
DEFAULT_WINDOW = 65_535


class MemoryTransport:
    """What the connection writes, kept; flow control never pushes back."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        data, self.data = bytes(self.data), bytearray()
        return data

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class Pair:
    """A server HTTP2Connection and an h2 client, one stream open between them."""

    def __init__(self) -> None:
        server = Server(config=parse_config(CONFIG), channels={})
        self.conn = HTTP2Connection(server, peer="test", peer_ip="127.0.0.1")
        self.wire = MemoryTransport()
        self.conn.connection_made(self.wire)  # type: ignore[arg-type]
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.client = h2.connection.H2Connection(config=config)
        self.client.initiate_connection()
        self.to_server()
        self.to_client()
        self.to_server()  # the SETTINGS ack
        self.stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(self.stream_id, REQUEST, end_stream=True)
        # Straight into h2, past the request handling: the stream is ours to write.
        self.conn.h2.receive_data(self.client.data_to_send())
        self.stream = H2Stream(self.conn, self.stream_id)
        self.conn.streams[self.stream_id] = self.stream
        self.conn.send_head(self.stream, 200, [])
        self.received = bytearray()
        self.ended: set[int] = set()  # streams whose END_STREAM arrived

    def to_server(self) -> None:
        self.conn.data_received(self.client.data_to_send())

    def to_client(self, *, ack: bool = False) -> list[h2.events.Event]:
        self.conn._flush()
        events = self.client.receive_data(self.wire.take())
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.received += event.data or b""
                if ack:
                    length = event.flow_controlled_length or 0
                    self.client.acknowledge_received_data(length, self.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id or 0)
        return events

    def windows(self) -> tuple[int, int]:
        h2conn = self.conn.h2
        return (
            h2conn.outbound_flow_control_window,
            h2conn.streams[self.stream_id].outbound_flow_control_window,
        )


def run(loop: asyncio.AbstractEventLoop, test: Callable[[], Awaitable[None]]) -> None:
    loop.run_until_complete(test())


@pytest.mark.parametrize("size", [1, 200, 16_384, 16_385, 40_000, DEFAULT_WINDOW])
def test_hand_framed_bytes_and_windows_match_h2_send_data(
    loop: asyncio.AbstractEventLoop, size: int
) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)

    async def test() -> None:
        ours, theirs = Pair(), Pair()
        ours.to_client(), theirs.to_client()  # the response heads, alike
        ours.stream.write(payload)
        ours.conn._flush()
        frame = theirs.conn.h2.max_outbound_frame_size
        for start in range(0, size, frame):  # send_data takes one frame at a time
            theirs.conn.h2.send_data(theirs.stream_id, payload[start : start + frame])
        assert ours.wire.take() == theirs.conn.h2.data_to_send()
        assert ours.windows() == theirs.windows()
        assert ours.windows() == (DEFAULT_WINDOW - size, DEFAULT_WINDOW - size)

    run(loop, test)


def test_a_real_client_reads_the_frames(loop: asyncio.AbstractEventLoop) -> None:
    async def test() -> None:
        pair = Pair()
        pieces = [b"data: one\n\n", b"x" * 20_000, b"data: three\n\n"]
        for piece in pieces:
            pair.stream.write(piece)
        pair.to_client()
        assert bytes(pair.received) == b"".join(pieces)

    run(loop, test)


def test_window_updates_release_held_bytes_in_order(loop: asyncio.AbstractEventLoop) -> None:
    async def test() -> None:
        pair = Pair()
        pieces = [bytes([n]) * 30_000 for n in range(1, 5)]  # 120 000 > the 65 535 window
        for piece in pieces:
            pair.stream.write(piece)
        pair.to_client()
        assert len(pair.received) == DEFAULT_WINDOW  # to the last byte of the window
        assert pair.stream.get_write_buffer_size() == 120_000 - DEFAULT_WINDOW
        acked = 0
        while pair.stream.get_write_buffer_size():
            before = len(pair.received)
            pair.client.acknowledge_received_data(before - acked, pair.stream_id)
            acked = before
            pair.to_server()  # WINDOW_UPDATEs: the held bytes go
            pair.to_client()
            assert len(pair.received) > before
        assert bytes(pair.received) == b"".join(pieces)

    run(loop, test)


def test_close_ends_the_stream_only_after_the_held_bytes(loop: asyncio.AbstractEventLoop) -> None:
    async def test() -> None:
        pair = Pair()
        pair.stream.write(b"a" * 70_000)
        pair.stream.close()
        pair.to_client()
        assert not pair.ended and pair.stream.is_closing()
        pair.client.acknowledge_received_data(len(pair.received), pair.stream_id)
        pair.to_server()
        pair.to_client()
        assert pair.ended == {pair.stream_id} and bytes(pair.received) == b"a" * 70_000

    run(loop, test)


def test_no_partial_frame_smaller_than_the_minimum(loop: asyncio.AbstractEventLoop) -> None:
    async def test() -> None:
        pair = Pair()
        first = DEFAULT_WINDOW - (MIN_PARTIAL_FRAME - 1)
        pair.stream.write(b"a" * first)  # leaves a window one byte short of the minimum
        pair.stream.write(b"b" * 10_000)  # bigger than what is left: held whole
        pair.to_client()
        assert bytes(pair.received) == b"a" * first
        assert pair.stream.get_write_buffer_size() == 10_000
        # Nothing smaller: a write that fits the small window whole still goes.
        pair.stream.pending, pair.stream.pending_bytes = [], 0
        pair.stream.write(b"c" * 100)
        pair.to_client()
        assert bytes(pair.received).endswith(b"c" * 100)

    run(loop, test)


def test_token_bucket_allows_a_burst_then_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("ssefan.edge.http2.time.monotonic", lambda: now[0])
    bucket = TokenBucket(burst=3, rate=2)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5  # one token back at 2/s
    assert [bucket.take(), bucket.take()] == [True, False]
    now[0] += 100  # refills to the burst, not beyond
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
