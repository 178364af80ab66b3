"""Network faults a test causes on purpose: connections severed mid-stream, ports that refuse.

* `CutProxy`: a loopback TCP forwarder whose connections the test can cut,
  a server-side disconnect no client can tell apart from a network failure.
* `free_port`: a loopback port nothing listens on (a refused connection, or
  a port to start something on later).

The upstream app's own faults (500s, stalls, garbage, dropped connections)
are knobs of `sse_upstream.FakeUpstream`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from waits import DEFAULT_TIMEOUT


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


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
