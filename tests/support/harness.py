"""Loopback test harness: a real upstream SSE app, a real ssefan process, real clients.

* `FakeUpstream`: an SSE app on 127.0.0.1:0 in its own thread and event loop,
  steerable from the test (publish, drop connections, answer 500/204/wrong
  type, stall, spew garbage) and recording every request it got.
* `SsefanProcess`: `python -m ssefan serve --config FILE` as a subprocess; the
  listening port (the config says port 0) is read from its log line.
* `SSEClient`: a minimal blocking SSE client over a raw socket, independent of
  ssefan's own parser, for precise assertions on bytes and events.

Everything binds port 0, waits on conditions (never fixed sleeps), and stops
what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_TIMEOUT = 10.0

# Client sockets the helpers opened, so that conftest closes the ones a test
# left open when it ends: a socket left to the garbage collector raises its
# ResourceWarning in whichever later test the collection happens to run.
OPEN_SOCKETS: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def connect(host: str, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> socket.socket:
    """A TCP connection to host:port, closed at the end of the test if not before."""
    sock = socket.create_connection((host, port), timeout=timeout)
    OPEN_SOCKETS.add(sock)
    return sock


def wait_until(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = ""
) -> None:
    """Poll `condition` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- upstream


@dataclass
class UpstreamRequest:
    method: str
    target: str
    headers: dict[str, str]


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeUpstream:
    """An SSE app on loopback that keeps a history and honours Last-Event-ID.

    Behaviour knobs (set them before ssefan connects, or call drop_all()):
      status, content_type: what the next connections are answered with.
      stall: send the head and then nothing (to trip ssefan's watchdog).
      replay: on Last-Event-ID, resend history after that id (a good app) —
        or, with replay_overlap=k, also resend the k events before it, so
        ssefan's de-duplication is exercised.
    """

    def __init__(self) -> None:
        self.status = 200
        self.content_type = "text/event-stream"
        self.stall = False
        self.replay = True
        self.replay_overlap = 0
        self.requests: list[UpstreamRequest] = []
        self.history: list[tuple[str, bytes]] = []  # (id, encoded block)
        self.accepted = 0
        self._conns: list[_Conn] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._lock = threading.Lock()
        self.port = 0

    # -- lifecycle
    def start(self) -> FakeUpstream:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(DEFAULT_TIMEOUT)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._loop.is_closed():
            return  # closed already (a test may stop the app before the fixture does)

        async def _stop() -> None:
            if self._server is not None:
                self._server.close()
            for conn in list(self._conns):
                conn.writer.transport.abort()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(DEFAULT_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEFAULT_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()  # else ResourceWarnings (errors under filterwarnings)

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


# --------------------------------------------------------------------------- ssefan


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class SsefanProcess:
    """`python -m ssefan serve` on a config whose listen port is 0."""

    LISTENING = re.compile(r"listening on (http://\S+)")

    def __init__(
        self,
        config_path: Path,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        self.config_path = config_path
        self.args = list(args)  # extra `ssefan serve` options, e.g. --log-level
        self.lines: list[str] = []
        self.url = ""
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> SsefanProcess:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ssefan",
                "serve",
                "--config",
                str(self.config_path),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self._env,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(
            lambda: bool(self.url) or self.proc is None or self.proc.poll() is not None,
            timeout,
            "ssefan to listen",
        )
        if not self.url:
            raise AssertionError("ssefan did not start:\n" + "\n".join(self.lines))
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self.url and (m := self.LISTENING.search(line)):
                self.url = m.group(1)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEFAULT_TIMEOUT)
        if self._reader is not None:
            self._reader.join(DEFAULT_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def route_config(upstream: FakeUpstream, **route: object) -> dict[str, object]:
    """A one-route config on 127.0.0.1:0 in front of `upstream`; `route` overrides."""
    base: dict[str, object] = {"path": "/events", "upstream": upstream.url, "heartbeat": "15s"}
    base.update(route)
    return {"listen": "127.0.0.1:0", "routes": [base]}


# --------------------------------------------------------------------------- clients


@dataclass
class ReceivedEvent:
    data: str
    event: str
    id: str | None


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


class SSEClient:
    """A blocking HTTP/1.1 client for one stream, with its own tiny SSE parser.

    It parses LF-terminated lines only (ssefan's canonical output), which is
    the point: it checks ssefan's bytes, not ssefan's parser against itself.
    """

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
    ) -> None:
        self.sock = connect(host, port, timeout)
        version = "HTTP/1.0" if http10 else "HTTP/1.1"
        lines = [f"{method} {path} {version}", f"Host: {host}:{port}", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self._buf = b""
        self.status, self.headers = self._read_head()
        self.chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        self._body = b""
        self.events: list[ReceivedEvent] = []
        self.comments: list[str] = []
        self.retry: int | None = None
        self.closed = False
        # Body bytes that came in the same read as the head are data too.
        self._decode_body()
        self._parse_events()

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
        return data

    def _read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self._buf:
            data = self._recv()
            if not data:
                raise ConnectionError("closed before the response head")
            self._buf += data
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return int(status_line.split(" ")[1]), headers

    def _decode_body(self) -> None:
        if not self.chunked:
            self._body += self._buf
            self._buf = b""
            return
        while True:
            head, sep, rest = self._buf.partition(b"\r\n")
            if not sep:
                return
            size = int(head, 16)
            if len(rest) < size + 2:
                return
            if size == 0:
                self.closed = True
                self._buf = b""
                return
            assert rest[size : size + 2] == b"\r\n", "bad chunk framing"
            self._body += rest[:size]
            self._buf = rest[size + 2 :]

    def _parse_events(self) -> None:
        while b"\n\n" in self._body:
            block, self._body = self._body.split(b"\n\n", 1)
            fields: dict[str, list[str]] = {}
            for line in block.decode("utf-8").split("\n"):
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                fields.setdefault(name, []).append(value)
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

    def pump(self) -> bool:
        """Read once (blocking up to the socket timeout); False at EOF."""
        data = self._recv()
        self._buf += data
        self._decode_body()
        self._parse_events()
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


def http_request(host: str, port: int, raw: bytes, timeout: float = DEFAULT_TIMEOUT) -> Response:
    """Send raw request bytes; read one Content-Length (or close-delimited) response."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(raw)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"closed before a response head: {buf!r}")
            buf += data
        head, body = buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        parts = status_line.split(" ", 2)
        return Response(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, body)


def get_stream(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> Response:
    """A GET of a stream path that expects a finite answer (a refusal or a status)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return http_request(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


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


@contextlib.contextmanager
def running(upstream: FakeUpstream, tmp_path: Path, **route: object) -> Iterator[SsefanProcess]:
    """ssefan in front of `upstream` with one route; stopped on exit."""
    path = write_config(tmp_path / "ssefan.yaml", route_config(upstream, **route))
    proc = SsefanProcess(path).start()
    try:
        yield proc
    finally:
        proc.stop()


# --------------------------------------------------------------------------- more helpers
# (fan-out, replay and upstream tests)


class StreamDecoder:
    """An incremental decoder of a stream response body: HTTP/1.1 chunks (or a
    raw close-delimited body) -> SSE blocks, LF line ends only, like SSEClient.

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
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        parsed: dict[str, str] = {}
        for line in header_lines:
            name, value = line.split(":", 1)
            parsed[name.strip().lower()] = value.strip()
        return cls(reader, writer, int(status_line.split(" ")[1]), parsed)

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


def holds_for(condition: Callable[[], bool], duration: float, what: str = "") -> None:
    """Assert `condition` stays true for `duration` seconds (for "nothing happens").

    Only for absences, which no event can signal; never for waiting on something.
    """
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not condition():
            raise AssertionError(f"stopped holding: {what or condition}")
        time.sleep(0.01)
    if not condition():
        raise AssertionError(f"stopped holding: {what or condition}")


def fast_upstream(upstream: FakeUpstream, **keys: object) -> dict[str, object]:
    """The mapping form of a route's upstream, with quick reconnects for tests."""
    return {"url": upstream.url, "backoff_base": "50ms", "backoff_max": "200ms", **keys}


def event_ids(events: list[ReceivedEvent]) -> list[str | None]:
    return [e.id for e in events]


# --------------------------------------------------------------------------- more helpers
# Added for test_http / test_slow_client / test_interop: multi-route configs with
# top-level settings, a raw keep-alive HTTP connection, and a TCP proxy that can
# sever its connections (a server-side disconnect no client can tell apart from
# a network failure).


def multi_route_config(
    upstream: FakeUpstream, routes: list[dict[str, object]], **top: object
) -> dict[str, object]:
    """A config on 127.0.0.1:0 with `routes` (each gets upstream + heartbeat defaults)."""
    full = [{"upstream": upstream.url, "heartbeat": "15s", **route} for route in routes]
    return {"listen": "127.0.0.1:0", **top, "routes": full}


@contextlib.contextmanager
def running_config(
    tmp_path: Path, config: dict[str, object], name: str = "ssefan.yaml"
) -> Iterator[SsefanProcess]:
    """ssefan on an arbitrary config dict; stopped on exit."""
    proc = SsefanProcess(write_config(tmp_path / name, config)).start()
    try:
        yield proc
    finally:
        proc.stop()


class RawConnection:
    """One client connection for hand-written requests and keep-alive checks."""

    def __init__(self, host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.sock = connect(host, port, timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed by the server; unread: {self.buf!r}")
        self.buf += data

    def read_head(self) -> Response:
        """The next response's status line and headers (body left unread)."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in lines:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        parts = status_line.split(" ", 2)
        return Response(int(parts[1]), parts[2] if len(parts) > 2 else "", headers, b"")

    def read_response(self, *, head_only: bool = False) -> Response:
        """The next complete response; `head_only` for answers to HEAD (no body)."""
        response = self.read_head()
        if head_only or response.status in (204, 304) or response.status < 200:
            return response
        if "content-length" in response.headers:
            length = int(response.headers["content-length"])
            while len(self.buf) < length:
                self._fill()
            response.body, self.buf = self.buf[:length], self.buf[length:]
        elif response.headers.get("transfer-encoding", "").lower() == "chunked":
            raise AssertionError("read_response does not decode chunked bodies")
        else:
            with contextlib.suppress(ConnectionError):
                while True:
                    self._fill()
            response.body, self.buf = self.buf, b""
        return response

    def read_until(self, marker: bytes, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Read into `buf` until it holds `marker`; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} after {timeout}s; got {self.buf!r}")
            self._fill()

    def wait_closed(self, timeout: float = DEFAULT_TIMEOUT) -> bytes:
        """Read until the server closes (EOF or reset); return what came before.

        Fails if the connection is still open after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"connection still open after {timeout}s; got {data!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionError:
                return data
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@dataclass
class ProxiedConnection:
    client: socket.socket
    server: socket.socket
    request_head: bytes = b""


class CutProxy:
    """A loopback TCP forwarder to `target` whose connections the test can sever.

    `cut()` closes both ends of every open connection: the client sees its
    stream end mid-body, as after a network failure or a server restart, and
    must reconnect by itself. `requests` holds each connection's request head
    (so a test can check the Last-Event-ID a client resumed with).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.connections: list[ProxiedConnection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._threads: list[threading.Thread] = []

    def start(self) -> CutProxy:
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, daemon=True)
        self._threads.append(thread)
        thread.start()

    @property
    def requests(self) -> list[dict[str, str]]:
        """Request headers (lower-case names) per connection, oldest first."""
        out = []
        with self._lock:
            heads = [conn.request_head for conn in self.connections]
        for head in heads:
            headers: dict[str, str] = {}
            for line in head.decode("latin-1").split("\r\n")[1:]:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            out.append(headers)
        return out

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=DEFAULT_TIMEOUT)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            conn = ProxiedConnection(client, server)
            with self._lock:
                self.connections.append(conn)
            self._spawn(self._pumper(conn, client, server, record=True))
            self._spawn(self._pumper(conn, server, client, record=False))

    def _pumper(
        self, conn: ProxiedConnection, src: socket.socket, dst: socket.socket, *, record: bool
    ) -> Callable[[], None]:
        def run() -> None:
            self._pump(conn, src, dst, record=record)

        return run

    def _pump(
        self, conn: ProxiedConnection, src: socket.socket, dst: socket.socket, *, record: bool
    ) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if record and b"\r\n\r\n" not in conn.request_head:
                    conn.request_head += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._sever(conn)

    @staticmethod
    def _sever(conn: ProxiedConnection) -> None:
        for sock in (conn.client, conn.server):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def cut(self) -> int:
        """Sever every open connection; return how many there were."""
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            self._sever(conn)
        return len(conns)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        with contextlib.suppress(OSError):
            self.listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(DEFAULT_TIMEOUT)


class FixedPortUpstream(FakeUpstream):
    """A FakeUpstream on a chosen port: the app coming back after a restart."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
