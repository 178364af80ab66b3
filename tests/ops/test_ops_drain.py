"""SIGTERM/SIGINT: stop accepting, end the streams spread over drain_window
(each with a jittered retry: hint), exit within shutdown_timeout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

from raw_http import Response
from sse_clients import AsyncSSEClient, refusal_of
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, route_config, signal_proc, write_config

from ssefan.ops.drain import DRAIN_RETRY_MS, MIN_DRAIN_RATE


async def open_clients(proc: SsefanProcess, n: int) -> list[AsyncSSEClient]:
    clients = await asyncio.gather(
        *(AsyncSSEClient.connect(proc.host, proc.port) for _ in range(n))
    )
    assert all(c.status == 200 for c in clients)
    return list(clients)


async def end_times(
    clients: list[AsyncSSEClient], within: float, first: asyncio.Event | None = None
) -> list[float]:
    """When each stream ended (terminal chunk or EOF), in time.monotonic();
    `first` is set as soon as one has."""

    async def one(client: AsyncSSEClient) -> float:
        while not client.decoder.ended:
            data = await client.reader.read(65536)
            if not data:
                break
            client.decoder.feed(data)
        if first is not None:
            first.set()
        return time.monotonic()

    async with asyncio.timeout(within):
        return list(await asyncio.gather(*(one(c) for c in clients)))


def start(upstream: FakeUpstream, tmp_path: Path, **top: object) -> SsefanProcess:
    config = {**route_config(upstream), **top}
    return SsefanProcess(write_config(tmp_path / "s.yaml", config)).start()


def test_sigterm_spreads_the_closes_over_the_window(upstream: FakeUpstream, tmp_path: Path) -> None:
    window, n = 1.5, 300
    assert n / MIN_DRAIN_RATE >= window  # enough clients to use the whole window
    proc = start(upstream, tmp_path, drain_window=f"{window}s", shutdown_timeout="5s")
    try:

        async def scenario() -> tuple[float, list[float], list[AsyncSSEClient]]:
            clients = await open_clients(proc, n)
            upstream.wait_connected()
            upstream.publish("before the drain", id="1")
            for client in clients:
                await client.read_events(1)
            sent = time.monotonic()
            signal_proc(proc, signal.SIGTERM)
            ended = await end_times(clients, within=window + 5)
            for client in clients:
                await client.close()
            return sent, ended, clients

        sent, ended, clients = asyncio.run(scenario())
        assert proc.proc is not None and proc.proc.wait(5) == 0
        exited = time.monotonic()
    finally:
        proc.stop()

    offsets = sorted(t - sent for t in ended)
    margin = 1.0
    assert offsets[-1] < window + margin, f"last close {offsets[-1]:.2f}s after SIGTERM"
    assert offsets[-1] - offsets[0] > window / 2, (
        f"closes spread over {offsets[-1] - offsets[0]:.2f}s"
    )
    buckets = Counter(int(t / 0.1) for t in offsets)
    assert max(buckets.values()) <= n // 4, f"{max(buckets.values())} closes in one 100 ms"
    assert exited - sent < 5  # within shutdown_timeout
    low, high = DRAIN_RETRY_MS
    retries = [c.decoder.retry for c in clients]
    assert all(r is not None and low <= r <= high for r in retries), retries[:5]
    assert len(set(retries)) > 1  # jittered, not one value for all
    assert all(c.decoder.ended for c in clients)  # a clean end of body, not a reset


def test_a_few_clients_do_not_hold_the_whole_window(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = start(upstream, tmp_path, drain_window="20s", shutdown_timeout="30s")
    try:

        async def scenario() -> float:
            clients = await open_clients(proc, 3)
            sent = time.monotonic()
            signal_proc(proc, signal.SIGTERM)
            ended = await end_times(clients, within=10)
            for client in clients:
                await client.close()
            return max(ended) - sent

        # 3 clients at >= MIN_DRAIN_RATE a second: well under a second.
        assert asyncio.run(scenario()) < 1.0
        assert proc.proc is not None and proc.proc.wait(5) == 0
    finally:
        proc.stop()


def test_a_second_sigint_ends_the_drain_at_once(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = start(upstream, tmp_path, drain_window="20s", shutdown_timeout="30s")
    try:

        async def scenario() -> tuple[float, float]:
            clients = await open_clients(proc, 600)  # 3 s at the minimum drain rate
            sent = time.monotonic()
            signal_proc(proc, signal.SIGINT)
            first = asyncio.Event()
            ending = asyncio.ensure_future(end_times(clients, within=10, first=first))
            async with asyncio.timeout(10):
                await first.wait()  # the drain has visibly begun: hurry it
            signal_proc(proc, signal.SIGINT)
            ended = await ending
            for client in clients:
                await client.close()
            return sent, max(ended)

        sent, last = asyncio.run(scenario())
        assert last - sent < 3.0 * 0.9, f"took {last - sent:.2f}s: the drain was not cut short"
        assert proc.proc is not None and proc.proc.wait(5) == 0
        assert "second SIGINT: ending the drain now" in proc.log_text()
    finally:
        proc.stop()


def test_keep_alive_connections_meet_the_drain_without_a_503(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The listener is closed, but keep-alive connections are still open. One
    idle between requests is closed at once, before any byte of a response (a
    browser resends its request on a fresh connection). One whose stream
    request is arriving gets the retry stream EventSource follows, never a
    503, and the connection closes after it."""
    window, n = 1.5, 300
    proc = start(upstream, tmp_path, drain_window=f"{window}s", shutdown_timeout="5s")
    try:

        async def exchange_404(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)

        async def scenario() -> tuple[bytes, bytes]:
            clients = await open_clients(proc, n)
            idle = await asyncio.open_connection(proc.host, proc.port)
            arriving = await asyncio.open_connection(proc.host, proc.port)
            await exchange_404(*idle)
            await exchange_404(*arriving)
            arriving[1].write(b"GET /events HTTP/1.1\r\nHost: x\r\n")  # head not finished
            await arriving[1].drain()
            # A round trip on a third connection, sent after those bytes were
            # in the server's socket: its event loop has read them by then.
            witness = await asyncio.open_connection(proc.host, proc.port)
            await exchange_404(*witness)
            witness[1].close()
            signal_proc(proc, signal.SIGTERM)
            first = asyncio.Event()
            ending = asyncio.ensure_future(end_times(clients, within=window + 5, first=first))
            async with asyncio.timeout(5):
                await first.wait()  # the drain is under way
            async with asyncio.timeout(5):
                idle_bytes = await idle[0].read()  # b"" at once: closed, nothing written
            arriving[1].write(b"\r\n")
            async with asyncio.timeout(5):
                answer = await arriving[0].read()  # all of it, then EOF: it closes
            await ending
            idle[1].close()
            arriving[1].close()
            for client in clients:
                await client.close()
            return idle_bytes, answer

        idle_bytes, answer = asyncio.run(scenario())
        assert proc.proc is not None and proc.proc.wait(5) == 0
    finally:
        proc.stop()
    assert idle_bytes == b""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    refusal = refusal_of(Response(int(status_line.split()[1]), "", headers, body))
    assert refusal["reason"] == "shutting_down"
    assert headers["connection"] == "close"
    low, high = DRAIN_RETRY_MS
    assert low <= int(str(refusal["retry_ms"])) <= high
