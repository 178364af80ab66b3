"""SIGTERM/SIGINT: stop accepting, end the streams spread over drain_window
(each with a jittered retry: hint), exit within shutdown_timeout."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from pathlib import Path

from harness import (
    AsyncSSEClient,
    FakeUpstream,
    SsefanProcess,
    StreamDecoder,
    route_config,
    write_config,
)
from opsharness import signal_proc

from ssefan.app import DRAIN_RETRY_MS, MIN_DRAIN_RATE


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


def test_a_stream_opened_during_the_drain_is_drained_too(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The listener is closed, but a keep-alive connection can still ask for a
    stream: it is refused (503) or ended like the others, with a retry: hint,
    not cut when the process stops."""
    window, n = 1.5, 300
    proc = start(upstream, tmp_path, drain_window=f"{window}s", shutdown_timeout="5s")
    try:

        async def scenario() -> tuple[int, dict[str, str], StreamDecoder]:
            clients = await open_clients(proc, n)
            reader, writer = await asyncio.open_connection(proc.host, proc.port)
            writer.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 404")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            signal_proc(proc, signal.SIGTERM)
            first = asyncio.Event()
            ending = asyncio.ensure_future(end_times(clients, within=window + 5, first=first))
            async with asyncio.timeout(5):
                await first.wait()  # the drain is under way
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ")[1])
            headers = {
                k.strip().lower(): v.strip()
                for k, _, v in (
                    line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:]
                )
                if k
            }
            late = StreamDecoder(chunked=True)
            if status == 200:
                async with asyncio.timeout(window + 5):
                    while not late.ended:
                        data = await reader.read(65536)
                        if not data:
                            break
                        late.feed(data)
            await ending
            writer.close()
            for client in clients:
                await client.close()
            return status, headers, late

        status, headers, late = asyncio.run(scenario())
        assert proc.proc is not None and proc.proc.wait(5) == 0
    finally:
        proc.stop()
    if status == 503:
        assert headers.get("retry-after")
    else:
        assert status == 200
        low, high = DRAIN_RETRY_MS
        assert late.retry is not None and low <= late.retry <= high, late.retry
        assert late.ended
