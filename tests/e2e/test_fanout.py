"""Fan-out over loopback: one upstream subscription, many clients, every event once.

ssefan runs as a subprocess in front of a real upstream SSE app; clients are raw
sockets with their own parser (tests/support/sse_clients.py).
"""

from __future__ import annotations

import asyncio
import re
import resource
import time
from pathlib import Path

import pytest
from sse_clients import AsyncSSEClient, ReceivedEvent, SSEClient, event_ids
from sse_upstream import FakeUpstream
from ssefan_process import running

CLIENTS = 1000
EVENTS = 20
# Sockets in this process (one per client) and in ssefan (one per client, plus
# the listener and the upstream), with room for the interpreter's own files.
FDS_NEEDED = CLIENTS + 200

# What an ssefan-assigned id may look like: short, and only characters that never
# need escaping in a header, a URL query or a CORS-safelisted request.
ASSIGNED_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE (ssefan, started later, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def connect_all(
    host: str, port: int, n: int, *, http10_every: int = 0
) -> list[AsyncSSEClient]:
    """Open `n` streams, at most 100 handshakes at a time (a polite burst)."""
    gate = asyncio.Semaphore(100)

    async def one(i: int) -> AsyncSSEClient:
        async with gate:
            http10 = http10_every > 0 and i % http10_every == 0
            return await AsyncSSEClient.connect(host, port, http10=http10, within=15)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_one_upstream_connection_serves_a_thousand_clients_every_event_once(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    raise_fd_limit(2 * FDS_NEEDED)
    expected = [str(i) for i in range(1, EVENTS + 1)]

    async def scenario(host: str, port: int) -> list[AsyncSSEClient]:
        # Every 10th client speaks HTTP/1.0 (close-delimited, unchunked body):
        # both of the channel's fan-out paths are exercised.
        clients = await connect_all(host, port, CLIENTS, http10_every=10)
        try:
            assert {c.status for c in clients} == {200}
            # Each client's response head is written in the same loop step that
            # subscribes it, so all of them are subscribed now.
            for i in range(1, EVENTS + 1):
                await asyncio.to_thread(upstream.publish, f"event number {i}", id=str(i))
            await asyncio.gather(*(c.read_events(EVENTS, within=15) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return clients

    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        started = time.monotonic()
        clients = asyncio.run(scenario(ssefan.host, ssefan.port))
        elapsed = time.monotonic() - started

    chunked = [c for c in clients if c.decoder.chunked]
    assert 0 < len(chunked) < CLIENTS  # both framings were in play
    for client in clients:
        assert event_ids(client.events) == expected  # all, in order, once
        assert [e.data for e in client.events] == [f"event number {i}" for i in expected]
    assert upstream.accepted == 1 and len(upstream.requests) == 1
    assert elapsed < 20, f"fan-out to {CLIENTS} clients took {elapsed:.1f}s"


def test_a_burst_in_one_upstream_write_reaches_every_client_complete(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    # 500 events in one write: ssefan parses them from one read (or a few) and
    # must deliver every one, whole, to every client.
    burst = b"".join(f"id: b{i}\ndata: burst {i} {'.' * 100}\n\n".encode() for i in range(500))

    async def scenario(host: str, port: int) -> list[AsyncSSEClient]:
        clients = await connect_all(host, port, 50, http10_every=5)
        try:
            await asyncio.to_thread(upstream.send_raw, burst)
            await asyncio.gather(*(c.read_events(500) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return clients

    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        clients = asyncio.run(scenario(ssefan.host, ssefan.port))

    for client in clients:
        assert event_ids(client.events) == [f"b{i}" for i in range(500)]
        assert all(e.data == f"burst {i} {'.' * 100}" for i, e in enumerate(client.events))
        assert client.decoder.pending == b""


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        pytest.param(
            b"data: first line\ndata: second line\ndata:\ndata: fourth\n\n",
            ReceivedEvent("first line\nsecond line\n\nfourth", "", None),
            id="multi-line-data",
        ),
        pytest.param(
            b'event: price-update\ndata: {"p": 1}\n\n',
            ReceivedEvent('{"p": 1}', "price-update", None),
            id="event-name",
        ),
        pytest.param(
            b"id: keep-me\nevent: tick\ndata: a\ndata: b\n\n",
            ReceivedEvent("a\nb", "tick", "keep-me"),
            id="upstream-id-kept",
        ),
        pytest.param(
            b"data:  two leading spaces\n\n",
            ReceivedEvent(" two leading spaces", "", None),
            id="leading-space-survives",
        ),
        pytest.param(
            b"data: crlf\r\ndata: lines\r\n\r\n",
            ReceivedEvent("crlf\nlines", "", None),
            id="crlf-normalised",
        ),
        pytest.param(
            "data: ünïcödé ✓ 😀\n\n".encode(),
            ReceivedEvent("ünïcödé ✓ 😀", "", None),
            id="utf-8",
        ),
    ],
)
def test_event_fields_survive_and_every_event_carries_an_id(
    upstream: FakeUpstream, tmp_path: Path, block: bytes, expected: ReceivedEvent
) -> None:
    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.send_raw(block)
            upstream.publish("marker", id="marker")
            (got, marker) = client.read_events(2)
        finally:
            client.close()
    assert (got.data, got.event) == (expected.data, expected.event)
    assert marker.id == "marker"
    if expected.id is not None:
        assert got.id == expected.id
    else:
        assert got.id is not None and ASSIGNED_ID.fullmatch(got.id), got.id


def test_assigned_ids_are_unique_cors_safe_and_resumable(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(10):
                upstream.publish(f"anonymous {i}")  # no id from the app
            events = client.read_events(10)
        finally:
            client.close()
        ids = [e.id for e in events]
        assert len(set(ids)) == 10
        for event_id in ids:
            assert event_id is not None and ASSIGNED_ID.fullmatch(event_id), event_id
        # A client that saw an assigned id resumes exactly after it.
        assert ids[4] is not None
        resumed = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": ids[4]})
        try:
            upstream.publish("anonymous 10")
            replayed = resumed.read_events(6)
        finally:
            resumed.close()
    assert [e.data for e in replayed] == [f"anonymous {i}" for i in range(5, 11)]
    assert [e.id for e in replayed[:5]] == ids[5:]
