"""Socket activation: ssefan serves on the socket systemd passes (LISTEN_FDS),
so a restart keeps the port open and no connection is refused."""

from __future__ import annotations

import socket
from pathlib import Path

from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, activated, route_config, write_config
from waits import DEFAULT_TIMEOUT, wait_until


def systemd_socket() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    return listener


def test_serves_on_the_passed_socket(upstream: FakeUpstream, tmp_path: Path) -> None:
    listener = systemd_socket()
    port = listener.getsockname()[1]
    # The config names another port: the passed socket wins.
    config = write_config(tmp_path / "s.yaml", route_config(upstream))
    proc = activated(config, listener)
    try:
        assert proc.port == port
        assert "serving on the socket systemd passed" in proc.log_text()
        upstream.wait_connected()
        client = SSEClient("127.0.0.1", port)
        assert client.status == 200
        upstream.publish("hello", id="1")
        assert [e.data for e in client.read_events(1)] == ["hello"]
        client.close()
    finally:
        proc.stop()
        listener.close()


def test_restart_keeps_the_socket_and_refuses_no_connection(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    listener = systemd_socket()
    port = listener.getsockname()[1]
    config = write_config(tmp_path / "s.yaml", route_config(upstream))
    first = activated(config, listener)
    try:
        upstream.wait_connected()
        before = SSEClient("127.0.0.1", port)
        upstream.publish("one", id="1")
        before.read_events(1)
    finally:
        assert first.stop() == 0
    before.read_until_closed()  # drained: its stream ended cleanly
    before.close()

    # No ssefan runs now, yet the port accepts: the kernel queues the
    # connection on the socket "systemd" still holds.
    waiting = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    waiting.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")

    second = activated(config, listener)
    try:
        assert second.port == port
        data = b""

        def read_until(marker: bytes) -> None:
            nonlocal data
            while marker not in data:
                chunk = waiting.recv(65536)
                assert chunk, f"closed before {marker!r}; got {data!r}"
                data += chunk

        read_until(b": ssefan\n")  # the stream is open
        assert data.startswith(b"HTTP/1.1 200 ")
        # The second instance's own subscription (the first one's is gone).
        wait_until(
            lambda: len(upstream.requests) == 2 and upstream.active == 1, what="resubscribed"
        )
        upstream.publish("two", id="2")
        read_until(b"data: two")
    finally:
        waiting.close()
        second.stop()
        listener.close()


def test_fds_meant_for_another_process_are_ignored(upstream: FakeUpstream, tmp_path: Path) -> None:
    # LISTEN_PID names someone else (say, a parent that inherited the
    # variables): ssefan must bind its own address, not touch fd 3.
    config = write_config(tmp_path / "s.yaml", route_config(upstream))
    proc = SsefanProcess(config, env={"LISTEN_FDS": "1", "LISTEN_PID": "1"}).start()
    try:
        assert "socket systemd passed" not in proc.log_text()
        client = SSEClient(proc.host, proc.port)
        assert client.status == 200
        client.close()
    finally:
        proc.stop()
