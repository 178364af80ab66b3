"""The admin listener's own limits: connections at once, a write deadline,
and one status rendering shared by every viewer. An Admin in this process,
on loopback, in front of a source that counts what it is asked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from waits import DEFAULT_TIMEOUT

from ssefan.ops import admin as admin_module
from ssefan.ops import metrics
from ssefan.ops.admin import Admin


class Source:
    def __init__(self, samples: int = 1) -> None:
        self.calls = 0
        self.samples = samples

    def readiness(self) -> list[str]:
        return []

    async def families(self) -> list[metrics.Family]:
        self.calls += 1
        family = metrics.Family("ssefan_clients", "gauge", "Client streams connected now.")
        for n in range(self.samples):
            family.add({"route": f"/route-{n:08d}-{'x' * 40}"}, n)
        return [family]


async def started(source: Source) -> tuple[Admin, int]:
    admin = Admin(source)
    await admin.start_tcp("127.0.0.1", 0)
    assert admin.server is not None
    return admin, int(admin.server.sockets[0].getsockname()[1])


async def request(
    port: int, target: str, host: str = "127.0.0.1"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    return reader, writer


async def status_of(reader: asyncio.StreamReader) -> int:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    return int(head.split(b" ")[1])


async def until(condition: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(DEFAULT_TIMEOUT):
        while not condition():  # noqa: ASYNC110 - the admin has no event to wait on
            await asyncio.sleep(0.01)
    assert condition(), what


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def test_connections_beyond_the_cap_get_503() -> None:
    cap = getattr(admin_module, "MAX_ADMIN_CONNECTIONS", 64)

    async def scenario() -> None:
        admin, port = await started(Source())
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        await until(lambda: len(admin._writers) == cap, "every connection accepted")
        reader, writer = await request(port, "/healthz")
        assert await status_of(reader) == 503
        writer.close()
        # The ones holding the slots are served as usual.
        first_reader, first_writer = idle[0]
        first_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert await status_of(first_reader) == 200
        for _, w in idle:
            w.close()
        await admin.stop()

    run(scenario)


def test_a_client_that_stops_reading_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "WRITE_TIMEOUT", 0.5, raising=False)

    async def scenario() -> None:
        # Metrics of tens of MB: more than the socket buffers hold.
        admin, port = await started(Source(samples=300_000))
        reader, writer = await request(port, "/metrics")
        await until(lambda: len(admin._writers) == 1, "the request being served")
        # The client reads nothing; within the deadline the admin gives up.
        await until(lambda: not admin._writers, "the stuck connection dropped")
        received = 0
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                while data := await reader.read(1 << 20):
                    received += len(data)
        assert received < 10_000_000, "the whole response was kept for it"
        writer.close()
        await admin.stop()

    run(scenario)


def test_status_viewers_share_one_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "STATUS_INTERVAL", 0.05)
    viewers, updates = 8, 4

    async def scenario() -> None:
        source = Source()
        admin, port = await started(source)
        streams = [await request(port, "/status") for _ in range(viewers)]

        async def read_updates(reader: asyncio.StreamReader) -> None:
            assert await status_of(reader) == 200
            seen = 0
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                while seen < updates:
                    line = await reader.readline()
                    seen += line.startswith(b"data: ")

        await asyncio.gather(*(read_updates(reader) for reader, _ in streams))
        # Each viewer saw `updates` renderings; they were rendered once for all.
        assert source.calls <= updates + 2, f"{source.calls} renderings for {viewers} viewers"
        for _, writer in streams:
            writer.close()
        await admin.stop()

    run(scenario)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1", 200),
        ("127.0.0.1:9090", 200),
        ("localhost:9090", 200),
        ("LocalHost", 200),
        ("[::1]:9090", 200),
        ("10.0.0.7", 200),  # an address: no name to rebind
        ("evil.example", 421),
        ("evil.example:9090", 421),
        ("localhost.evil.example", 421),
        ("127.0.0.1.nip.io", 421),
    ],
)
def test_a_loopback_admin_answers_only_local_hosts(host: str, status: int) -> None:
    """DNS rebinding: a page whose name resolves to 127.0.0.1 sends its own
    name as Host; the loopback admin answers it 421 and serves no metrics."""
    source = Source()

    async def scenario() -> None:
        admin, port = await started(source)
        try:
            reader, writer = await request(port, "/metrics", host)
            assert await status_of(reader) == status
            body = await reader.read()
            assert (b"ssefan_clients" in body) == (status == 200)
            writer.close()
        finally:
            await admin.stop()

    run(scenario)
    assert source.calls == (1 if status == 200 else 0)
