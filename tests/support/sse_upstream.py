"""The upstream SSE app ssefan subscribes to, on loopback, steered by the test.

* `FakeUpstream`: an SSE app on 127.0.0.1:0 in its own thread and event loop,
  steerable from the test (publish, drop connections, answer 500/204/wrong
  type, stall, spew garbage) and recording every request it got.
* `FixedPortUpstream`: the same on a chosen port (the app back after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

from loopback_server import LoopbackServer
from waits import DEFAULT_TIMEOUT, wait_until


@dataclass
class UpstreamRequest:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeUpstream(LoopbackServer):
    """An SSE app on loopback that keeps a history and honours Last-Event-ID.

    Behaviour knobs (set them before ssefan connects, or call drop_all()):
      status, content_type: what the next connections are answered with.
      stall: send the head and then nothing (to trip ssefan's watchdog).
      replay: on Last-Event-ID, resend history after that id (a good app) —
        or, with replay_overlap=k, also resend the k events before it, so
        ssefan's de-duplication is exercised.
    """

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.content_type = "text/event-stream"
        self.stall = False
        self.replay = True
        self.replay_overlap = 0
        self.requests: list[UpstreamRequest] = []
        self.history: list[tuple[str, bytes]] = []  # (id, encoded block)
        self.accepted = 0
        self._conns: list[_Conn] = []

    def _live_writers(self) -> list[asyncio.StreamWriter]:
        return [conn.writer for conn in self._conns]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    @property
    def active(self) -> int:
        return len(self._conns)

    def _call(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(DEFAULT_TIMEOUT)

    # -- steering
    def publish(self, data: str, *, id: str | None = None, event: str = "") -> None:
        """Publish one event to every connected ssefan (and keep it in history)."""
        lines = []
        if id is not None:
            lines.append(f"id: {id}")
        if event:
            lines.append(f"event: {event}")
        lines += [f"data: {piece}" for piece in data.split("\n")]
        self.send_raw(("\n".join(lines) + "\n\n").encode(), history_id=id or "")

    def send_raw(self, block: bytes, history_id: str | None = None) -> None:
        """Write bytes as they are to every connection (garbage welcome)."""

        def write() -> None:
            if history_id is not None:
                self.history.append((history_id, block))
            for conn in self._conns:
                conn.writer.write(block)

        self._call(write)

    def drop_all(self) -> None:
        """Abort every open upstream connection (ssefan must reconnect)."""

        def drop() -> None:
            for conn in self._conns:
                conn.writer.transport.abort()
                conn.done.set()

        self._call(drop)

    def wait_connected(self, n: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_until(lambda: self.active >= n, timeout, f"{n} upstream connection(s)")

    def wait_requests(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_until(lambda: len(self.requests) >= n, timeout, f"{n} upstream request(s)")

    # -- server side
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        self.requests.append(UpstreamRequest(method, target, headers))
        if self.status != 200:
            body = b"" if self.status == 204 else b"nope\n"
            writer.write(
                f"HTTP/1.1 {self.status} X\r\ncontent-length: {len(body)}\r\n"
                "connection: close\r\n\r\n".encode()
                + body
            )
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        writer.write(
            f"HTTP/1.1 200 OK\r\ncontent-type: {self.content_type}\r\n"
            "cache-control: no-cache\r\nconnection: close\r\n\r\n".encode()
        )
        if self.stall:
            conn = _Conn(writer)
            self._conns.append(conn)
            await conn.done.wait()
            self._conns.remove(conn)
            return
        last = headers.get("last-event-id")
        if last is not None and self.replay:
            ids = [i for i, _ in self.history]
            if last in ids:
                start = max(0, ids.index(last) + 1 - self.replay_overlap)
                for _, block in self.history[start:]:
                    writer.write(block)
        conn = _Conn(writer)
        self._conns.append(conn)
        try:
            while not conn.done.is_set():
                data = await reader.read(1024)
                if not data:
                    break
        except ConnectionError:
            pass
        finally:
            self._conns.remove(conn)
            writer.close()


class FixedPortUpstream(FakeUpstream):
    """A FakeUpstream on a chosen port: the app coming back after a restart."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port
