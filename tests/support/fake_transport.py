"""An in-memory transport and a subscriber on it, for channel tests without sockets.

`FakeTransport` records what the channel writes and can push back the way an
asyncio transport does: from inside `write`, by calling the protocol's
`pause_writing`, which the server forwards to `Channel.pause`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from sse_clients import StreamDecoder

from ssefan.stream.channel import Channel, DisconnectReason, Subscriber


class FakeTransport:
    """Records writes; `on_write` runs after each write, like asyncio's flow control."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0  # what get_write_buffer_size() reports
        self.limits: tuple[int | None, int | None] | None = None
        self.aborted = False
        self.closed = False
        self.on_write: Callable[[bytes], None] | None = None

    def write(self, data: bytes) -> None:
        assert not (self.aborted or self.closed), "write after close"
        self.writes.append(data)
        if self.on_write is not None:
            self.on_write(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no socket, no peer: an in-memory transport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def abort(self) -> None:
        self.aborted = True

    def is_aborted(self) -> bool:  # a call, so type checkers don't pin an earlier assert
        return self.aborted

    def close(self) -> None:
        self.closed = True


class Client:
    """A subscriber on a fake transport, plus a decoder of what it was sent."""

    def __init__(self, channel: Channel, *, chunked: bool = True) -> None:
        self.channel = channel
        self.transport = FakeTransport()
        self.reasons: list[DisconnectReason] = []
        self.sub = Subscriber(
            cast("asyncio.WriteTransport", self.transport),
            chunked=chunked,
            on_close=self.reasons.append,
        )
        self.chunked = chunked

    def decoded(self) -> StreamDecoder:
        decoder = StreamDecoder(chunked=self.chunked)
        for data in self.transport.writes:
            decoder.feed(data)
        assert not decoder.pending, "a write ended inside an event"
        return decoder

    def ids(self) -> list[str | None]:
        return [e.id for e in self.decoded().events]

    def pause_on_next_write(self) -> None:
        """Push back from inside the next write, as a full asyncio transport does."""

        def pause(_: bytes) -> None:
            self.transport.on_write = None
            self.channel.pause(self.sub)

        self.transport.on_write = pause
