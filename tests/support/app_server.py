"""A real app on loopback for the pass-through and forward-auth tests.

`TestApp` is `http.server` (stdlib, one thread per connection, HTTP/1.1
keep-alive): an HTTP implementation independent of ssefan's h11, so the tests
check ssefan against someone else's parser. Every request is recorded with
the id of the TCP connection it came on. The test steers it through gates
(threading.Event) instead of sleeps, and `close()` releases whatever waits.

Endpoints:
  /echo[/...]        JSON of what arrived: method, target, headers, body length and sha256
  /bytes?n=N         N bytes of a known pattern, written 64 KiB at a time (progress in `written`)
  /sink              reads the request body only once gate "sink" opens; answers its length
  /stream            chunked: "part-1", then waits for gate "stream", "part-2"
  /sse               text/event-stream: event one, waits for gate "sse", event two
  /hop               a response full of hop-by-hop headers
  /slow              reads the request, never answers (until close)
  /close-on-reuse    answers on a fresh connection; on a reused one closes unanswered
  /stray[?later]     answers, then writes a stray 408 on the connection (?later: once
                     gate "stray" opens, when ssefan has pooled it)
  /clte              a chunked body whose head also says Content-Length: 3 (RFC 9112
                     §6.3: Transfer-Encoding wins; the length is not the body's)
  /ws                WebSocket (RFC 6455): 101, a "hello" frame, then echoes frames
  /auth              forward-auth: Cookie session=<name> or Authorization "Bearer <name>"
                     looked up in `auth_rules` (name -> status; unknown: 401); names in
                     `auth_held` wait for gate "auth" first

The /ws frames are `ws_frames`' codec.
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

from waits import DEFAULT_TIMEOUT, wait_until
from ws_frames import read_ws_frame, ws_accept, ws_frame

PATTERN = bytes(range(256))


@dataclass
class SeenRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    connection: int  # which TCP connection (per-connection counter)
    nth_on_connection: int  # 1 for the first request on its connection
    at: float  # time.monotonic() when the head had arrived

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return ", ".join(values) if values else None

    def has(self, name: str) -> bool:
        return any(k.lower() == name.lower() for k, _ in self.headers)


class TestApp:
    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self.auth_rules: dict[str, int] = {}
        self.gates: dict[str, threading.Event] = {
            name: threading.Event() for name in ("stream", "sse", "sink", "auth", "stray")
        }
        self.auth_held: set[str] = set()  # /auth waits for gate "auth" for these names
        self.closed_at: dict[int, float] = {}  # connection id -> when ssefan closed it
        self.written: dict[str, int] = {}  # /bytes target -> body bytes written so far
        self.released = threading.Event()  # close(): every waiting handler returns
        self.connections = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        app = self

        class Handler(_Handler):
            owner: ClassVar[TestApp] = app

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> TestApp:
        self._thread.start()
        return self

    def close(self) -> None:
        self.released.set()
        for gate in self.gates.values():
            gate.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(DEFAULT_TIMEOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def next_connection_id(self) -> int:
        with self._lock:
            self.connections += 1
            return next(self._ids)

    def record(self, request: SeenRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def seen(self, path: str) -> list[SeenRequest]:
        with self._lock:
            return [r for r in self.requests if urlsplit(r.target).path == path]

    def wait_seen(self, path: str, n: int = 1) -> list[SeenRequest]:
        wait_until(lambda: len(self.seen(path)) >= n, what=f"{n} request(s) to {path}")
        return self.seen(path)


class _Handler(http.server.BaseHTTPRequestHandler):
    owner: ClassVar[TestApp]
    protocol_version = "HTTP/1.1"  # keep-alive, chunked
    server_version = "TestApp"

    def setup(self) -> None:
        super().setup()
        self.connection_id = self.owner.next_connection_id()
        self.served = 0

    def finish(self) -> None:
        super().finish()
        self.owner.closed_at[self.connection_id] = time.monotonic()

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def __getattr__(self, name: str) -> object:
        if name.startswith("do_"):
            return self.dispatch
        raise AttributeError(name)

    # -- request
    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = bytearray()
            while True:
                line = self.rfile.readline()
                if not line:
                    raise ConnectionResetError("the body was cut off")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length", "0"))
        return self.rfile.read(length) if length else b""

    def dispatch(self) -> None:
        self.served += 1
        path = urlsplit(self.path).path
        if path == "/close-on-reuse" and self.served > 1:
            # The keep-alive race: the app closed this connection just as ssefan
            # reused it, without reading or answering the request.
            self.record(b"")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        body = self.read_body() if path not in ("/ws", "/sink") else b""
        self.record(body)
        endpoint = path.split("/")[1]  # /echo/anything is /echo
        handler = getattr(self, "route_" + endpoint.replace("-", "_"), None)
        if handler is None:
            self.reply(404, b"no such endpoint\n")
            return
        handler(body)

    def record(self, body: bytes) -> None:
        self.owner.record(
            SeenRequest(
                self.command,
                self.path,
                list(self.headers.items()),
                body,
                self.connection_id,
                self.served,
                time.monotonic(),
            )
        )

    # -- response helpers
    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers or []:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%b\r\n" % (len(data), data))
        self.wfile.flush()

    def wait(self, gate: threading.Event) -> None:
        gate.wait(DEFAULT_TIMEOUT)

    # -- endpoints
    def route_echo(self, body: bytes) -> None:
        payload = {
            "method": self.command,
            "target": self.path,
            "headers": list(self.headers.items()),
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "connection": self.connection_id,
        }
        self.reply(200, json.dumps(payload).encode(), "application/json")

    def route_bytes(self, body: bytes) -> None:
        n = int(parse_qs(urlsplit(self.path).query)["n"][0])
        body = pattern(n)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(n))
        self.end_headers()
        piece = 64 * 1024
        for start in range(0, n, piece):
            self.wfile.write(body[start : start + piece])
            self.owner.written[self.path] = min(n, start + piece)

    def route_sink(self, body: bytes) -> None:
        # Reads nothing of the body until the gate opens: the upload must stall.
        self.wait(self.owner.gates["sink"])
        body = self.read_body()
        self.reply(200, str(len(body)).encode())

    def route_stream(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b"part-1\n")
        self.wait(self.owner.gates["stream"])
        self.chunk(b"part-2\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_sse(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.chunk(b"data: one\n\n")
        self.wait(self.owner.gates["sse"])
        self.chunk(b"data: two\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_hop(self, body: bytes) -> None:
        self.reply(
            200,
            b"hop\n",
            headers=[
                ("Connection", "X-Hop-Secret"),
                ("X-Hop-Secret", "per-connection"),
                ("Keep-Alive", "timeout=5"),
                ("Proxy-Authenticate", 'Basic realm="proxy"'),
                ("Trailer", "X-Checksum"),
                ("Upgrade", "h2c"),
                ("X-End-To-End", "kept"),
            ],
        )

    def route_slow(self, body: bytes) -> None:
        self.wait(self.owner.released)
        self.close_connection = True

    def route_stray(self, body: bytes) -> None:
        # Answers, then writes an unasked-for response on the idle connection
        # (some servers send a 408 before an idle close) and keeps it open.
        self.reply(200, b"answered\n")
        self.wfile.flush()
        if "later" in self.path:
            self.wait(self.owner.gates["stray"])
        self.wfile.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        self.wfile.flush()

    def route_close_on_reuse(self, body: bytes) -> None:
        self.reply(200, f"fresh connection {self.connection_id}\n".encode())

    def route_auth(self, body: bytes) -> None:
        name = None
        cookie = self.headers.get("Cookie", "")
        for part in cookie.split(";"):
            key, _, value = part.strip().partition("=")
            if key == "session":
                name = value
        authorization = self.headers.get("Authorization", "")
        if name is None and authorization.startswith("Bearer "):
            name = authorization.removeprefix("Bearer ")
        if name in self.owner.auth_held:
            self.wait(self.owner.gates["auth"])
        status = self.owner.auth_rules.get(name or "", 401)
        if status == 401:
            self.reply(
                401,
                b"who are you?\n",
                headers=[("WWW-Authenticate", 'Bearer realm="ssefan-test"')],
            )
        elif status == 403:
            self.reply(403, b"not you\n")
        else:
            self.reply(status, b"")

    def route_clte(self, body: bytes) -> None:
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        self.chunk(b"0123456789")
        self.wfile.write(b"0\r\n\r\n")

    def route_ws(self, body: bytes) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "").encode()
        if self.headers.get("Upgrade", "").lower() != "websocket" or not key:
            self.reply(400, b"not a websocket handshake\n")
            return
        head = (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {ws_accept(key)}\r\n\r\n"
        )
        # A frame in the same write as the 101 head: it must survive the switch.
        self.wfile.write(head.encode() + ws_frame(0x1, b"hello", mask=False))
        self.wfile.flush()
        self.close_connection = True
        while True:
            frame = read_ws_frame(self.rfile.read)
            if frame is None:
                return
            opcode, payload = frame
            self.wfile.write(ws_frame(opcode, payload, mask=False))
            self.wfile.flush()
            if opcode == 0x8:  # close: echoed, then done (RFC 6455 §5.5.1)
                return


def pattern(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]
