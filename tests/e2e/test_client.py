"""http/client.py, the one HTTP client, against real sockets: a whole exchange
over an abstract Unix socket (the supervisor's scrape), a bounded `read`
that loses no byte (the upstream's batches), and the two ways an origin
fails: a reset, reported with the socket's own error, and a malformed
head, reported without the bytes it quoted."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import h11
import pytest
import uvloop

from ssefan.http.client import (
    Origin,
    OriginClosed,
    OriginConnection,
    OriginProtocolError,
    connect,
    connect_unix,
    fetch,
    split_url,
)
from ssefan.stream.status import FailureKind, classify

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
LOOPS = [
    pytest.param(asyncio.new_event_loop, id="asyncio"),
    pytest.param(uvloop.new_event_loop, id="uvloop"),
]


def run(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], main: Coroutine[Any, Any, None]
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def receive_all(connection: OriginConnection) -> None:
    while True:
        await connection.receive()


async def tcp_server(handler: Handler) -> tuple[asyncio.Server, Origin]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, split_url(f"http://127.0.0.1:{port}/")[0]


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_fetch_over_an_abstract_unix_socket(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    name = f"ssefan-test-{os.getpid()}-{secrets.token_hex(4)}"
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        status = b"200 OK" if len(seen) == 1 else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 " + status + b'\r\ncontent-length: 7\r\n\r\n{"a":1}')
        writer.close()

    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(b"\0" + name.encode())
        server = await asyncio.start_unix_server(handler, sock=listener)
        request = h11.Request(method="GET", target="/metrics.json", headers=[("host", "worker")])
        replies = []
        for _ in range(2):
            connection = await connect_unix(b"\0" + name.encode())
            try:
                replies.append(await asyncio.wait_for(fetch(connection, request), 5))
            finally:
                connection.close()
        server.close()
        assert [(r.status, r.reason, r.body) for r in replies] == [
            (200, b"OK", b'{"a":1}'),
            (503, b"Service Unavailable", b'{"a":1}'),
        ]
        assert seen[0].startswith(b"GET /metrics.json HTTP/1.1\r\nhost: worker\r\n")
        with pytest.raises(ConnectionRefusedError):
            await connect_unix(b"\0" + name.encode() + b"-nobody")

    run(loop_factory, main())


@pytest.mark.parametrize("loop_factory", LOOPS)
def test_a_bounded_read_splits_what_arrived_and_loses_nothing(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, sent at once: reads bring far more than 64 KiB

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body))
        await writer.drain()
        writer.close()

    async def main() -> None:
        server, origin = await tcp_server(handler)
        connection = await connect(origin, connect_timeout=5)
        connection.write(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        connection.write(h11.EndOfMessage())
        got, reads = bytearray(), []
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                reads.append(await asyncio.wait_for(connection.read(64 * 1024), 5))
            elif isinstance(event, h11.Data):
                got += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        connection.close()
        await connection.wait_closed()
        server.close()
        assert bytes(got) == body
        assert max(reads) <= 64 * 1024 and len(reads) >= len(body) // (64 * 1024)

    run(loop_factory, main())


def test_a_reset_carries_the_sockets_error_and_reads_as_a_lost_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: x\n\n")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # linger 0: an RST, not a FIN

    async def main() -> None:
        server, origin = await tcp_server(handler)
        connection = await connect(origin, connect_timeout=5)
        connection.write(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        with pytest.raises(OriginClosed) as closed:
            await asyncio.wait_for(receive_all(connection), 5)
        server.close()
        assert isinstance(closed.value.__cause__, ConnectionResetError)
        kind, text = classify(closed.value, origin)
        assert kind is FailureKind.CLOSED
        assert text.startswith(f"connection to 127.0.0.1:{origin.port} lost (ConnectionResetError")

    run(uvloop.new_event_loop, main())


def test_a_malformed_head_is_a_protocol_error_that_does_not_quote_it() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nset-cookie session=s3cret\r\n\r\n")
        await reader.read()  # until the client hangs up
        writer.close()

    async def main() -> None:
        server, origin = await tcp_server(handler)
        connection = await connect(origin, connect_timeout=5)
        connection.write(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        with pytest.raises(OriginProtocolError) as malformed:
            await asyncio.wait_for(connection.receive(), 5)
        connection.close()
        await connection.wait_closed()
        server.close()
        await server.wait_closed()
        assert "s3cret" not in str(malformed.value)
        kind, text = classify(malformed.value, origin)
        assert kind is FailureKind.PROTOCOL and "malformed" in text and "s3cret" not in text

    run(uvloop.new_event_loop, main())
