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
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_TIMEOUT = 10.0


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

    def __init__(self, config_path: Path, *, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.lines: list[str] = []
        self.url = ""
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> SsefanProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ssefan", "serve", "--config", str(self.config_path)],
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
        self.sock = socket.create_connection((host, port), timeout=timeout)
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


@contextlib.contextmanager
def running(upstream: FakeUpstream, tmp_path: Path, **route: object) -> Iterator[SsefanProcess]:
    """ssefan in front of `upstream` with one route; stopped on exit."""
    path = write_config(tmp_path / "ssefan.yaml", route_config(upstream, **route))
    proc = SsefanProcess(path).start()
    try:
        yield proc
    finally:
        proc.stop()
