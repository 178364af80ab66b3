"""Hand-written HTTP/1.1 over raw sockets, so tests control every byte ssefan receives.

* `connect`: a TCP connection recorded in `OPEN_SOCKETS`, which conftest
  closes when a test leaves one open.
* `RawConnection`: one keep-alive connection for hand-written requests.
* `http_request` / `get_stream`: one request, one finite response.

Responses are parsed here (`parse_response_head`), not by an HTTP library, so
the assertions are on what ssefan actually sent.
"""

from __future__ import annotations

import contextlib
import socket
import time
import weakref
from dataclasses import dataclass

from waits import DEFAULT_TIMEOUT

# Client sockets the helpers opened, so that conftest closes the ones a test
# left open when it ends: a socket left to the garbage collector raises its
# ResourceWarning in whichever later test the collection happens to run.
OPEN_SOCKETS: weakref.WeakSet[socket.socket] = weakref.WeakSet()


def connect(host: str, port: int, timeout: float | None = DEFAULT_TIMEOUT) -> socket.socket:
    """A TCP connection to host:port, closed at the end of the test if not before."""
    sock = socket.create_connection((host, port), timeout=timeout)
    OPEN_SOCKETS.add(sock)
    return sock


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


def parse_response_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """(status, reason, headers with lower-case names) of a response head without its
    final blank line."""
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    parts = status_line.split(" ", 2)
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


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
        status, reason, headers = parse_response_head(head)
        return Response(status, reason, headers, b"")

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
        status, reason, headers = parse_response_head(head)
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return Response(status, reason, headers, body)


def get_stream(host: str, port: int, path: str, headers: dict[str, str] | None = None) -> Response:
    """A GET of a stream path that expects a finite answer (a refusal or a status)."""
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return http_request(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
