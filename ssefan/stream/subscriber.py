"""A client's stream as the channel holds it: a transport, its flow control, a cursor.

The transport's write-buffer marks decide when a client pushes back
(`pause_writing`, and the channel takes it off the live set) and when it may
catch up again (`resume_writing`). The channel's policy (core.cursors) sees a
Subscriber as a `Reader`: the cursor and pause state are its, the framing of
what is sent to this one client is HTTP/1.1 chunks or none (core.framing).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

from ssefan.core.cursors import DisconnectReason
from ssefan.core.framing import chunk

__all__ = ["CATCH_UP_SLICE_BYTES", "WRITE_HIGH_WATER", "WRITE_LOW_WATER", "Subscriber"]

# Per-client transport buffer before `pause_writing`. 64 KiB is asyncio's own
# default; with 10 000 clients that still bounds user-space buffers to ~640 MiB
# in the worst case where every client stops reading at once.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# A catch-up write (replay or recovery after backpressure) carries at most one
# high-water mark's worth; the mark then decides whether to go on at once. So
# what one client has buffered stays within about twice the mark.
CATCH_UP_SLICE_BYTES = WRITE_HIGH_WATER


class Subscriber:
    """A client stream: a transport plus a cursor into the ring (a core.cursors.Reader)."""

    __slots__ = ("chunked", "closed", "cursor", "on_close", "paused", "transport")

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        chunked: bool,
        on_close: Callable[[DisconnectReason], None] | None = None,
    ) -> None:
        self.transport = transport
        self.chunked = chunked  # HTTP/1.1 chunked framing, else close-delimited
        self.cursor = 0  # seq of the next event it needs (meaningful when not live)
        self.paused = False
        self.closed = False
        self.on_close = on_close
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    @property
    def writer(self) -> Callable[[bytes], object]:
        """The transport's write, kept while live: the fan-out's bytes are framed already."""
        return self.transport.write

    def send(self, payload: bytes) -> None:
        """Write bytes framed for this client (not the shared fan-out path)."""
        if self.chunked:
            payload = chunk(payload)
        self.transport.write(payload)

    def unsent(self) -> int:
        return self.transport.get_write_buffer_size()

    def reset(self) -> None:
        """Drop the connection now, unsent bytes and all: a stuck client would
        never flush a graceful close."""
        # abort() drops our buffer, but the kernel would still try to deliver
        # what its send buffer holds (MiBs for a stuck socket on Linux) before
        # closing. SO_LINGER with a zero timeout makes close() send RST and
        # free it now.
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()
