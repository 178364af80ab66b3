"""The HTTP/2 limits and the known attacks (issue 14; docs/http2.md's table),
against a real ssefan over TLS on loopback.

Each attack comes on a connection of its own, with frames h2 would not send
made by hand (hyperframe, hpack). Each must end in a GOAWAY with the code the
table names, a close, a counted `ssefan_http2_events_total{event=...}`, and
bounded memory, while 50 healthy HTTP/2 streams on another connection lose no
event. The zero-window stall is the one that is not a GOAWAY: the stuck stream
is reset by the lag rules while its neighbours on the same connection go on.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import hpack
import pytest
from h2_client import H2Client
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from opsharness import admin_url, scrape, value
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, stop_clean, write_config
from tls_certs import Cert, make_cert
from waits import wait_until

HEALTHY = 50
MAX_STREAMS = 100
LAG_LIMIT = 64 * 1024
# What one attack may add to ssefan's resident memory, at most.
RSS_BOUND = 32 * 1024 * 1024
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def ssefan(
    stream_upstream: FakeUpstream, cert: Cert, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    config = {
        "listen": {
            "address": "127.0.0.1:0",
            "tls": {"cert": str(cert.cert), "key": str(cert.key)},
            "http2": {"max_concurrent_streams": MAX_STREAMS},
        },
        "admin": {"listen": "127.0.0.1:0"},
        "routes": [
            {"path": "/events", "upstream": stream_upstream.url, "max_client_lag_bytes": "64KiB"}
        ],
    }
    path = write_config(Path(tmp_path_factory.mktemp("limits")) / "ssefan.yaml", config)
    proc = SsefanProcess(path).start()
    try:
        stream_upstream.wait_connected()
        yield proc
    finally:
        stop_clean(proc)


class Healthy:
    """50 well-behaved streams on one connection, checked for every event."""

    def __init__(self, proc: SsefanProcess, cert: Cert, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.client = H2Client(proc.port, cert.client_context(), window=1 << 24)
        self.streams = [self.client.responses[self.client.request("/events")] for _ in range(50)]
        self.client.wait(lambda: all(s.headers for s in self.streams), what="50 healthy heads")
        self.sent: list[str] = []

    def publish(self, n: int = 1) -> None:
        for _ in range(n):
            event_id = str(next(_ids))
            self.upstream.publish(f"healthy {event_id}", id=event_id)
            self.sent.append(event_id)

    def check(self) -> None:
        """Every stream has every event published so far, in order, and is open."""
        self.client.wait(
            lambda: all(len(s.events) >= len(self.sent) for s in self.streams),
            what=f"{len(self.sent)} events on {HEALTHY} healthy streams",
        )
        for stream in self.streams:
            assert [e.id for e in stream.events] == self.sent
            assert not stream.done


@pytest.fixture(scope="module")
def healthy(ssefan: SsefanProcess, cert: Cert, stream_upstream: FakeUpstream) -> Iterator[Healthy]:
    streams = Healthy(ssefan, cert, stream_upstream)
    try:
        yield streams
    finally:
        streams.client.close()


def rss(proc: SsefanProcess) -> int:
    assert proc.proc is not None
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def counted(proc: SsefanProcess, event: str) -> float:
    samples = scrape(admin_url(proc))
    key = ("ssefan_http2_events_total", frozenset({("event", event)}))
    return samples.get(key, 0.0)


def head_block(encoder: hpack.Encoder, path: str = "/events") -> bytes:
    return encoder.encode(
        [(":method", "GET"), (":scheme", "https"), (":authority", "localhost"), (":path", path)]
    )


def headers(stream_id: int, block: bytes, *flags: str) -> bytes:
    frame = HeadersFrame(stream_id, data=block)
    for flag in flags:
        frame.flags.add(flag)
    return frame.serialize()


def attacker(proc: SsefanProcess, cert: Cert) -> H2Client:
    """A connection that has sent only the preface and SETTINGS: the rest is by hand."""
    client = H2Client(proc.port, cert.client_context())
    client.wait(lambda: bool(client.remote_settings), what="the server's SETTINGS")
    return client


def goaway_code(client: H2Client) -> int:
    """Read until the server closes; the GOAWAY code it sent."""
    client.wait_closed()
    assert client.goaway is not None, "closed without a GOAWAY"
    return int(client.goaway.error_code or 0)


def run_attack(
    ssefan: SsefanProcess,
    healthy: Healthy,
    event: str,
    attack: bytes,
    cert: Cert,
    *,
    chunk: int = 1 << 16,
) -> int:
    """Send `attack` on a fresh connection (events flowing to the healthy streams
    before and after); returns the GOAWAY code, checks the count and the memory."""
    before, memory = counted(ssefan, event), rss(ssefan)
    healthy.publish(3)
    client = attacker(ssefan, cert)
    try:
        for start in range(0, len(attack), chunk):
            try:
                client.send_raw(attack[start : start + chunk])
            except OSError:
                break  # the server closed on us mid-attack: that is the answer
        code = goaway_code(client)
    finally:
        client.close()
    healthy.publish(3)
    healthy.check()
    assert counted(ssefan, event) == before + 1
    assert rss(ssefan) - memory < RSS_BOUND
    return code


CALM = h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_rapid_reset(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    encoder = hpack.Encoder()
    frames = bytearray()
    for n in range(1500):  # the burst allows 1000
        stream_id = 1 + 2 * n
        frames += headers(stream_id, head_block(encoder), "END_HEADERS", "END_STREAM")
        frames += RstStreamFrame(stream_id, error_code=8).serialize()
    assert run_attack(ssefan, healthy, "goaway_rapid_reset", bytes(frames), cert) == CALM


def test_ping_flood_from_a_client_that_never_reads(
    ssefan: SsefanProcess, healthy: Healthy, cert: Cert
) -> None:
    # 20 000 PINGs written without reading a byte: the ACKs would pile up
    # unread, but the server stops at the 101st.
    pings = b"".join(PingFrame(0, opaque_data=b"%08d" % n).serialize() for n in range(20_000))
    assert run_attack(ssefan, healthy, "goaway_ping_flood", pings, cert) == CALM


def test_settings_flood(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    frame = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535})
    flood = frame.serialize() * 500
    assert run_attack(ssefan, healthy, "goaway_settings_flood", flood, cert) == CALM


def test_empty_data_flood(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    opening = headers(1, head_block(hpack.Encoder()), "END_HEADERS")
    empty = DataFrame(1, data=b"").serialize() * 1000
    assert run_attack(ssefan, healthy, "goaway_empty_frames", opening + empty, cert) == CALM


def test_continuation_flood(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    # A header block that never ends: CONTINUATION after CONTINUATION, each
    # carrying a little more of an endless header value (CVE-2024-27316).
    start = headers(1, head_block(hpack.Encoder()) + b"\x40\x05x-pad\x7f\xff\xff\xff\x07")
    more = b"".join(ContinuationFrame(1, data=b"a" * 1000).serialize() for _ in range(2000))
    code = run_attack(ssefan, healthy, "goaway_protocol_error", start + more, cert)
    assert code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_hpack_bomb(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    # One 4 KiB header put in the dynamic table, then referenced by its
    # 1-byte index thousands of times: a few KiB that decode to 40 MiB.
    encoder = hpack.Encoder()
    first = encoder.encode([("x-bomb", "b" * 4000)])
    bomb = head_block(encoder) + first + bytes([0x80 | 62]) * 10_000
    assert len(bomb) <= 16_000, "the bomb must fit one frame"
    frames = headers(1, bomb, "END_HEADERS", "END_STREAM")
    code = run_attack(ssefan, healthy, "goaway_header_flood", frames, cert)
    assert code in (CALM, h2.errors.ErrorCodes.COMPRESSION_ERROR)


def test_more_streams_than_advertised(ssefan: SsefanProcess, healthy: Healthy, cert: Cert) -> None:
    encoder = hpack.Encoder()
    frames = b"".join(
        headers(1 + 2 * n, head_block(encoder), "END_HEADERS") for n in range(MAX_STREAMS + 1)
    )
    code = run_attack(ssefan, healthy, "goaway_too_many_streams", frames, cert)
    assert code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_advertised_limits(ssefan: SsefanProcess, cert: Cert) -> None:
    client = attacker(ssefan, cert)
    try:
        settings = client.remote_settings
        assert settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
        assert settings[SettingsFrame.MAX_HEADER_LIST_SIZE] > 0
        assert settings.get(SettingsFrame.ENABLE_CONNECT_PROTOCOL, 0) == 0
    finally:
        client.close()


def test_a_stream_with_no_window_is_cut_off_and_its_neighbours_go_on(
    ssefan: SsefanProcess, healthy: Healthy, cert: Cert, stream_upstream: FakeUpstream
) -> None:
    # Streams get h2's default 64 KiB window; the connection a large one.
    client = H2Client(ssefan.port, cert.client_context(), connection_window=1 << 24)
    try:
        stuck_id = client.request("/events")
        client.stalled.add(stuck_id)  # its window is never given back; the connection's is
        stuck = client.responses[stuck_id]
        neighbours = [client.responses[client.request("/events")] for _ in range(5)]
        client.wait(lambda: bool(stuck.headers) and all(n.headers for n in neighbours))
        resets = counted(ssefan, "resets_sent")
        big = "x" * 16_000
        sent: list[str] = []
        # The stuck stream's window (64 KiB, h2's default) fills, then its lag
        # passes max_client_lag_bytes: the lag rules reset it.
        # Paced by the neighbours, which read each event before the next.
        for _ in range(12):
            event_id = str(next(_ids))
            stream_upstream.publish(big, id=event_id)
            healthy.sent.append(event_id)
            sent.append(event_id)
            client.wait(
                lambda: all(len(n.events) >= len(sent) for n in neighbours), what="the neighbours"
            )
            healthy.check()  # read too, or its socket would push back on all 50
        client.wait(lambda: stuck.reset is not None, what="the stuck stream's RST_STREAM")
        assert stuck.reset == h2.errors.ErrorCodes.CANCEL
        assert len(stuck.body) <= 65_535
        for neighbour in neighbours:
            assert [e.id for e in neighbour.events] == sent and not neighbour.done
        assert counted(ssefan, "resets_sent") == resets + 1
        wait_until(
            lambda: (
                value(
                    scrape(admin_url(ssefan)),
                    "ssefan_disconnects_total",
                    route="/events",
                    reason="slow",
                )
                >= 1
            ),
            what="the cut-off counted as slow",
        )
    finally:
        client.close()
    healthy.check()
