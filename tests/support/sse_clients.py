"""SSE clients with their own parser, so tests check ssefan's bytes rather than its parser.

* `StreamDecoder`: HTTP/1.1 chunks (or a close-delimited body) -> SSE blocks,
  fed bytes from any source: a socket, or what a fake transport recorded.
* `SSEClient`: one blocking stream over a raw socket.
* `AsyncSSEClient`: one asyncio stream (for tests that need a thousand).
* `refusal_of`: the `ssefan-retry` answer of a temporary refusal, checked.

They parse LF-terminated lines only (ssefan's canonical output), which is the
point: a CR where ssefan should have written LF fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from raw_http import OPEN_SOCKETS, Response, connect, parse_response_head
from waits import DEFAULT_TIMEOUT


@dataclass
class ReceivedEvent:
    data: str
    event: str
    id: str | None


def event_ids(events: list[ReceivedEvent]) -> list[str | None]:
    return [e.id for e in events]


class StreamDecoder:
    """An incremental decoder of a stream response body: HTTP/1.1 chunks (or a
    raw close-delimited body) -> SSE blocks, LF line ends only.

    It keeps every block it saw, so a test can check framing (comments, id-only
    blocks) as well as events. Usable on bytes from any source: a socket, or the
    writes a fake transport recorded.
    """

    def __init__(self, *, chunked: bool) -> None:
        self.chunked = chunked
        self.ended = False  # the terminal chunk arrived
        self.events: list[ReceivedEvent] = []
        self.comments: list[str] = []
        self.id_only: list[str] = []  # ids of blocks that set an id but had no data
        self.retry: int | None = None
        self._raw = b""
        self._body = b""

    def feed(self, data: bytes) -> None:
        self._raw += data
        if self.chunked:
            self._dechunk()
        else:
            self._body += self._raw
            self._raw = b""
        self._parse()

    def _dechunk(self) -> None:
        while not self.ended:
            head, sep, rest = self._raw.partition(b"\r\n")
            if not sep:
                return
            size = int(head, 16)
            if len(rest) < size + 2:
                return
            assert rest[size : size + 2] == b"\r\n", f"bad chunk framing: {self._raw[:80]!r}"
            if size == 0:
                self.ended = True
            self._body += rest[:size]
            self._raw = rest[size + 2 :]

    def _parse(self) -> None:
        while b"\n\n" in self._body:
            block, self._body = self._body.split(b"\n\n", 1)
            fields: dict[str, list[str]] = {}
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
            if "retry" in fields:
                self.retry = int(fields["retry"][-1])
            if "data" in fields:
                self.events.append(
                    ReceivedEvent(
                        data="\n".join(fields["data"]),
                        event=fields.get("event", [""])[-1],
                        id=fields["id"][-1] if "id" in fields else None,
                    )
                )
            elif "id" in fields:
                self.id_only.append(fields["id"][-1])

    @property
    def pending(self) -> bytes:
        """Body bytes not yet forming a whole block (an event cut in half)."""
        return self._body


class SSEClient:
    """A blocking HTTP/1.1 client for one stream, decoding with a `StreamDecoder`."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str = "/events",
        *,
        headers: dict[str, str] | None = None,
        http10: bool = False,
        method: str = "GET",
        timeout: float = DEFAULT_TIMEOUT,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = connect(host, port, timeout)
        if tls is not None:
            # The handshake happens here; server_hostname is the SNI sent and checked.
            self.sock = tls.wrap_socket(self.sock, server_hostname="localhost")
            OPEN_SOCKETS.add(self.sock)
        version = "HTTP/1.0" if http10 else "HTTP/1.1"
        lines = [f"{method} {path} {version}", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.closed = False  # EOF, or the terminal chunk
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = self._recv()
            if not data:
                raise ConnectionError("closed before the response head")
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        self.status, _, self.headers = parse_response_head(head)
        chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self.decoder = StreamDecoder(chunked=chunked)
        # Body bytes that came in the same read as the head are data too.
        self._feed(body)

    @property
    def events(self) -> list[ReceivedEvent]:
        return self.decoder.events

    @property
    def comments(self) -> list[str]:
        return self.decoder.comments

    @property
    def retry(self) -> int | None:
        return self.decoder.retry

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
        return data

    def _feed(self, data: bytes) -> None:
        self.decoder.feed(data)
        if self.decoder.ended:
            self.closed = True

    def pump(self) -> bool:
        """Read once (blocking up to the socket timeout); False at EOF."""
        data = self._recv()
        self._feed(data)
        return bool(data) and not self.closed

    def read_events(self, n: int, timeout: float = DEFAULT_TIMEOUT) -> list[ReceivedEvent]:
        """Block until at least `n` events arrived in total; return them all."""
        deadline = time.monotonic() + timeout
        while len(self.events) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"got {len(self.events)} of {n} events: {self.events}")
            if not self.pump():
                raise AssertionError(f"stream ended after {len(self.events)} of {n} events")
        return self.events

    def read_until_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with contextlib.suppress(ConnectionError):
            while self.pump():
                if time.monotonic() > deadline:
                    raise AssertionError("stream did not end")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def pump_until(
    client: SSEClient,
    condition: Callable[[], bool],
    timeout: float = DEFAULT_TIMEOUT,
    what: str = "",
) -> None:
    """Read from `client` until `condition` holds; fail after `timeout` or at EOF."""
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        client.sock.settimeout(remaining)
        try:
            alive = client.pump()
        except TimeoutError:
            continue
        if not alive and not condition():
            raise AssertionError(f"stream ended while waiting for {what or condition}")


class AsyncSSEClient:
    """An asyncio client for one stream (for tests that need a thousand of them)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: int,
        headers: dict[str, str],
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers
        chunked = headers.get("transfer-encoding", "").lower() == "chunked"
        self.decoder = StreamDecoder(chunked=chunked)
        self.eof = False

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        path: str = "/events",
        *,
        headers: dict[str, str] | None = None,
        http10: bool = False,
        within: float = DEFAULT_TIMEOUT,
    ) -> AsyncSSEClient:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection(host, port)
            version = "HTTP/1.0" if http10 else "HTTP/1.1"
            lines = [f"GET {path} {version}", f"Host: {host}:{port}", "Accept: text/event-stream"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
        status, _, parsed = parse_response_head(head[:-4])
        return cls(reader, writer, status, parsed)

    @property
    def events(self) -> list[ReceivedEvent]:
        return self.decoder.events

    async def read_events(self, n: int, within: float = DEFAULT_TIMEOUT) -> list[ReceivedEvent]:
        """Wait (up to `within` seconds) until at least `n` events arrived; return them all."""
        try:
            async with asyncio.timeout(within):
                while len(self.decoder.events) < n:
                    data = await self.reader.read(65536)
                    if not data:
                        self.eof = True
                        break
                    self.decoder.feed(data)
        except TimeoutError:
            pass
        if len(self.decoder.events) < n:
            raise AssertionError(
                f"got {len(self.decoder.events)} of {n} events (eof={self.eof}):"
                f" {self.decoder.events[-3:]}"
            )
        return self.decoder.events

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def refusal_of(response: Response) -> dict[str, object]:
    """The `ssefan-retry` event of a temporary refusal, checked for the form an
    EventSource retries: 200 text/event-stream, a finite body, a `retry:` and
    a named event with the reason (and no `id:` that would move the client's
    resume point)."""
    assert response.status == 200, (response.status, response.body)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" in response.headers, "a refusal is a finite body"
    blocks = [b for b in response.body.decode("utf-8").split("\n\n") if b]
    fields = [dict(line.split(": ", 1) for line in block.split("\n")) for block in blocks[1:]]
    assert blocks[0] == ": ssefan", blocks
    assert len(fields) == 1 and "id" not in fields[0], fields
    (event,) = fields
    assert event["event"] == "ssefan-retry", event
    data = json.loads(event["data"])
    assert isinstance(data, dict)
    assert int(event["retry"]) == data["retry_ms"] >= 500
    return data
