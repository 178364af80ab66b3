"""One client that never reads must not slow anybody else, and must be cut off.

A raw socket with a tiny receive buffer connects and never calls recv. A
hundred ordinary clients read. The test publishes 4 KiB events in lock-step:
event k+1 is published only after every reader has event k. If ssefan ever
waited on the stuck client, the lock-step would stall and the test fail; since
ssefan cuts the stuck client off only after more than `max_client_lag_bytes`
of unsent data, every event published between "its buffers are full" and "it
is cut off" was, by construction, delivered to all readers while it was stuck.
"""

from __future__ import annotations

import re
import selectors
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sse_clients import SSEClient, StreamDecoder
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, running

READERS = 100
LAG_LIMIT = 256 * 1024
EVENT_BYTES = 4 * 1024


def _kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer autotunes to (Linux), 4 MiB if unknown."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


# Hard stop: the cut-off must come before this much was published. What a stuck
# client can absorb: its receive window, ssefan's kernel send buffer (on
# loopback it autotunes to megabytes), the transport's 64 KiB high-water mark
# and then LAG_LIMIT of lag; the rest is margin.
MAX_EVENTS = (_kernel_send_buffer_max() + 2 * LAG_LIMIT + 256 * 1024) // EVENT_BYTES
# Events published after the cut-off: the readers must get these too.
EVENTS_AFTER_CUT = 20
STEP_TIMEOUT = 5.0
CUT_OFF = re.compile(r"route=/events client cut off: (slow|evicted)")


@dataclass
class Reader:
    client: SSEClient
    arrived: list[float] = field(default_factory=list)  # monotonic time per event


@pytest.fixture
def ssefan(upstream: FakeUpstream, tmp_path: Path) -> Iterator[SsefanProcess]:
    with running(
        upstream,
        tmp_path,
        max_client_lag_bytes=f"{LAG_LIMIT // 1024}KiB",
        buffer=MAX_EVENTS + 100,  # the ring holds everything: the cut is for lag, not eviction
        buffer_bytes="64MiB",
    ) as proc:
        upstream.wait_connected()
        yield proc


def stuck_client(host: str, port: int) -> socket.socket:
    """A stream request from a socket that will never be read from."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
    sock.settimeout(10.0)
    sock.connect((host, port))
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    return sock


def read_to_end(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Everything the socket still holds, and how it ended: "eof" or "reset"."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data, "reset"
        except TimeoutError:
            raise AssertionError(f"still open after {timeout}s ({len(data)} bytes read)") from None
        if not chunk:
            return data, "eof"
        data += chunk


def wait_all_have(readers: list[Reader], n: int, selector: selectors.BaseSelector) -> None:
    """Read from every reader until each holds `n` events; stamp arrival times."""
    deadline = time.monotonic() + STEP_TIMEOUT
    behind = {id(r) for r in readers if len(r.client.events) < n}
    while behind:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            counts = sorted(len(r.client.events) for r in readers)
            raise AssertionError(f"readers stalled waiting for event {n}: counts {counts[:5]}...")
        for key, _ in selector.select(remaining):
            reader: Reader = key.data
            assert reader.client.pump(), "a reader's stream ended"
            now = time.monotonic()
            reader.arrived += [now] * (len(reader.client.events) - len(reader.arrived))
            if len(reader.client.events) >= n:
                behind.discard(id(reader))


def test_stuck_client_is_cut_off_and_others_keep_receiving(
    upstream: FakeUpstream, ssefan: SsefanProcess
) -> None:
    stuck = stuck_client(ssefan.host, ssefan.port)
    readers = [Reader(SSEClient(ssefan.host, ssefan.port)) for _ in range(READERS)]
    selector = selectors.DefaultSelector()
    published: list[tuple[str, str, float]] = []  # (id, data, publish time)
    cut_at: int | None = None  # how many events were published when the log said so
    try:
        assert all(r.client.status == 200 for r in readers)
        for reader in readers:
            selector.register(reader.client.sock, selectors.EVENT_READ, reader)
        padding = "x" * (EVENT_BYTES - 16)
        while len(published) < MAX_EVENTS:
            k = len(published)
            event_id, data = f"e{k}", f"{k:08d}:{padding}"
            published.append((event_id, data, time.monotonic()))
            upstream.publish(data, id=event_id)
            wait_all_have(readers, k + 1, selector)
            if cut_at is None and CUT_OFF.search(ssefan.log_text()):
                cut_at = k + 1
            if cut_at is not None and len(published) >= cut_at + EVENTS_AFTER_CUT:
                break
        assert cut_at is not None, (
            f"the stuck client was not cut off after {len(published)} events of"
            f" {EVENT_BYTES} bytes (limit {LAG_LIMIT}):\n{ssefan.log_text()[-2000:]}"
        )

        # Completeness and order for every reader, including events published
        # after the stuck client's buffers were full and after it was cut off.
        want_ids = [event_id for event_id, _, _ in published]
        want_data = [data for _, data, _ in published]
        for reader in readers:
            assert [e.id for e in reader.client.events] == want_ids
            assert [e.data for e in reader.client.events] == want_data

        # It was cut for lag, not early: more than the limit was published first.
        assert cut_at * EVENT_BYTES > LAG_LIMIT, cut_at

        # The stuck client: its connection ends (reset or EOF) once we read, and
        # what it had received is an in-order prefix of the stream, far short of all.
        raw, how = read_to_end(stuck, 5.0)
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:100]
        body = raw.split(b"\r\n\r\n", 1)[1]
        decoder = StreamDecoder(chunked=True)
        decoder.feed(body)
        got = [e.id for e in decoder.events]
        assert got == want_ids[: len(got)], "the stuck client's events are out of order"
        assert len(got) < cut_at, (how, len(got), cut_at)

        # Delivery delay per event (max over readers), for the record: printed
        # with -s, never compared with a fixed number on a shared CI machine.
        delays = [
            max(r.arrived[i] for r in readers) - published[i][2] for i in range(len(published))
        ]
        print(
            f"\n{len(published)} events x {READERS} readers, stuck client cut after {cut_at}"
            f" ({how}); delivery delay median {statistics.median(delays) * 1000:.1f} ms,"
            f" max {max(delays) * 1000:.1f} ms"
        )
    finally:
        selector.close()
        stuck.close()
        for reader in readers:
            reader.client.close()
