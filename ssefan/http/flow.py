"""Flow control for protocols that hand their bytes to a coroutine.

An `asyncio.Protocol` is pushed bytes (`data_received`) and told when its
peer stops reading (`pause_writing`). A pass-through exchange is a coroutine
that pulls: it wants "the next bytes" and "wait until the peer can take more".
`Inbox` and `WriteGate` bridge the two with TCP backpressure intact, so a
proxied upload or download never buffers more than a window in memory:
reading from one side is paused while the other side is not taking bytes.
(uvicorn keeps the same pair in `flow_control.py`; aiohttp in `base_protocol.py`.)
"""

from __future__ import annotations

import asyncio
import copy

__all__ = ["INBOX_HIGH_WATER", "READ_WINDOW", "Inbox", "WriteGate"]

# How much of a peer's bytes ssefan takes in at a time, wherever it reads a
# stream: asyncio's own StreamReader limit (`asyncio.streams`' default
# `limit`), one socket read's worth and enough to keep a loopback pipe full.
READ_WINDOW = 64 * 1024
# Bytes received but not yet consumed before reading pauses: one read window,
# small enough that 10 000 stalled exchanges pin < 1 GiB.
INBOX_HIGH_WATER = READ_WINDOW


def fresh(stored: BaseException) -> BaseException:
    """A copy of a stored error, to raise in its place.

    Raising the stored instance ties its traceback to it: the raising frames,
    which hold the object that stores it, and so a reference cycle per failed
    connection that only a full collection frees (a pause for every client).
    """
    try:
        copied = copy.copy(stored)
    except Exception:  # an exception type that can't be rebuilt: raise it as it is
        return stored
    copied.__cause__ = stored.__cause__
    copied.__suppress_context__ = stored.__suppress_context__
    return copied


class Inbox:
    """Bytes a transport delivered and a consumer has not taken yet, bounded."""

    __slots__ = (
        "_chunks",
        "_eof",
        "_error",
        "_high_water",
        "_loop",
        "_paused",
        "_size",
        "_transport",
        "_waiter",
    )

    def __init__(self, transport: asyncio.Transport, high_water: int = INBOX_HIGH_WATER) -> None:
        self._transport = transport
        self._high_water = high_water
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._error: BaseException | None = None
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        # Looked up once: asyncio.get_running_loop() checks the pid (a system
        # call) every time, and a get() waits once per read.
        self._loop = asyncio.get_running_loop()

    def put(self, data: bytes) -> None:
        if self._eof or self._error is not None:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._high_water and not self._paused:
            self._paused = True
            if not self._transport.is_closing():
                self._transport.pause_reading()
        self._wake()

    def put_eof(self) -> None:
        self._eof = True
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The connection is gone: pending and future `get`s raise `exc`."""
        if self._error is None:
            self._error = exc
        self._wake()

    async def get(self) -> bytes:
        """Everything buffered, waiting for bytes if there are none; b"" at EOF."""
        while not self._chunks:
            if self._error is not None:
                raise fresh(self._error)
            if self._eof:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take()

    def take(self) -> bytes:
        """Everything buffered right now, without waiting (b"" if nothing)."""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        if self._paused:
            self._paused = False
            if not self._transport.is_closing():
                self._transport.resume_reading()
        return data

    @property
    def pending(self) -> int:
        """Bytes buffered and not yet taken."""
        return self._size

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class WriteGate:
    """`pause_writing`/`resume_writing` as something a coroutine can await."""

    __slots__ = ("_error", "_paused", "_waiter")

    def __init__(self) -> None:
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    async def wait(self) -> None:
        """Return at once unless the peer pushed back; raise if the connection is gone.

        The common case (not paused) returns without yielding to the loop.
        """
        while True:
            if self._error is not None:
                raise fresh(self._error)
            if not self._paused:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
