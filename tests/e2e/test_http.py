"""The client-facing HTTP surface of a real ssefan process, over raw loopback sockets.

Response headers and framing of streams (HTTP/1.1 chunked, HTTP/1.0
close-delimited, HEAD), keep-alive, every refusal (400, 431, 404, 405, 408,
503) and CORS. Each refusal is checked against a stream that was already
open: bad input must never disturb another client.

Most tests share one ssefan process (module scope) with one route per concern;
the global `max_clients` cap and the short `header_timeout` get their own.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from raw_http import RawConnection, get_stream
from sse_clients import SSEClient, pump_until, refusal_of
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, multi_route_config, running_config
from waits import wait_until

ALLOWED_ORIGIN = "https://app.example"
OTHER_ORIGIN = "https://evil.example"
MAX_HEADER_BYTES = 1024
HEADER_TIMEOUT = 0.3

ROUTES: list[dict[str, object]] = [
    {"path": "/events", "retry": "2s"},
    {"path": "/plain"},
    {"path": "/limited", "max_clients": 2},
    {"path": "/limited-status", "max_clients": 2, "refuse": "status"},
    {"path": "/cors-star", "cors": {"allow_origins": ["*"], "max_age": "2m"}},
    {
        "path": "/cors-cred",
        "cors": {"allow_origins": [ALLOWED_ORIGIN], "allow_credentials": True},
    },
]

_unique = itertools.count()


@pytest.fixture(scope="module")
def ssefan(
    stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    config = multi_route_config(
        stream_upstream,
        ROUTES,
        max_header_bytes=f"{MAX_HEADER_BYTES}B",
    )
    with running_config(tmp_path_factory.mktemp("http"), config) as proc:
        stream_upstream.wait_connected(len(ROUTES))
        yield proc


@pytest.fixture
def witness(ssefan: SsefanProcess) -> Iterator[SSEClient]:
    """A stream opened before the test does anything; it must keep flowing."""
    client = SSEClient(ssefan.host, ssefan.port, "/plain")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def conn(ssefan: SsefanProcess) -> Iterator[RawConnection]:
    connection = RawConnection(ssefan.host, ssefan.port)
    try:
        yield connection
    finally:
        connection.close()


def expect_event(client: SSEClient, data: str, timeout: float = 5.0) -> None:
    """Read from `client` until an event with `data` arrives."""
    pump_until(client, lambda: any(e.data == data for e in client.events), timeout, repr(data))


def assert_still_streaming(upstream: FakeUpstream, client: SSEClient) -> None:
    data = f"still-streaming-{next(_unique)}"
    upstream.publish(data)
    expect_event(client, data)


def request(method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: ssefan.test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --------------------------------------------------------------------------- streams

OPENING = b": ssefan\n\n"


@pytest.mark.parametrize(
    ("path", "headers", "retry"),
    [
        pytest.param("/events", {}, 2000, id="retry-hint-2s"),
        pytest.param(
            "/plain",
            {"Accept-Encoding": "gzip, deflate, br"},
            3000,
            id="gzip-refused-default-retry",
        ),
    ],
)
def test_stream_response_headers_and_opening(
    ssefan: SsefanProcess,
    stream_upstream: FakeUpstream,
    path: str,
    headers: dict[str, str],
    retry: int | None,
) -> None:
    client = SSEClient(ssefan.host, ssefan.port, path, headers=headers)
    try:
        assert client.status == 200
        h = client.headers
        assert h["content-type"] == "text/event-stream; charset=utf-8"
        assert h["cache-control"] == "no-cache, no-store, no-transform"
        assert h["x-accel-buffering"] == "no"
        assert h["transfer-encoding"] == "chunked"
        assert "content-length" not in h
        assert "content-encoding" not in h
        # The opening comment (and the retry hint) come at once, before any event.
        pump_until(
            client,
            lambda: "ssefan" in client.comments and (retry is None or bool(client.retry)),
            5.0,
            "the opening comment",
        )
        assert client.comments[:1] == ["ssefan"]
        assert client.events == []
        data = f"first-{next(_unique)}"
        stream_upstream.publish(data)
        expect_event(client, data)
        assert [e.data for e in client.events] == [data]
        assert client.events[0].id, "every event carries an id"
        assert client.retry == retry
    finally:
        client.close()


def test_http10_stream_is_close_delimited(
    ssefan: SsefanProcess, stream_upstream: FakeUpstream, conn: RawConnection
) -> None:
    conn.send(b"GET /plain HTTP/1.0\r\nHost: ssefan.test\r\n\r\n")
    response = conn.read_head()
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "transfer-encoding" not in response.headers
    assert "content-length" not in response.headers
    data = f"http10-{next(_unique)}"
    stream_upstream.publish(data)
    conn.read_until(f"data: {data}\n\n".encode(), 5.0)
    # No chunk framing: the body is SSE text, starting with the opening comment.
    assert conn.buf.startswith(OPENING)
    assert b"\r\n" not in conn.buf
    assert conn.buf.endswith(f"data: {data}\n\n".encode())


def test_head_on_stream_route_then_keep_alive(conn: RawConnection) -> None:
    conn.send(request("HEAD", "/events"))
    head = conn.read_response(head_only=True)
    assert head.status == 200
    assert head.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert head.headers["cache-control"] == "no-cache, no-store, no-transform"
    # Same connection: the HEAD answer had no body, so the next response follows.
    conn.send(request("GET", "/nope"))
    after = conn.read_response()
    assert after.status == 404
    assert conn.buf == b"", "no stream body may follow a HEAD answer"


@pytest.mark.parametrize("pipelined", [False, True], ids=["sequential", "pipelined"])
def test_keep_alive_for_ordinary_responses(conn: RawConnection, pipelined: bool) -> None:
    first, second = request("GET", "/nope"), request("POST", "/events", {"Content-Length": "0"})
    if pipelined:
        conn.send(first + second)
    else:
        conn.send(first)
    assert conn.read_response().status == 404
    if not pipelined:
        conn.send(second)
    response = conn.read_response()
    assert response.status == 405
    assert "connection" not in response.headers


# --------------------------------------------------------------------------- refusals

BIG_REQUEST = request("GET", "/events", {"X-Padding": "a" * 4096})  # 4 KiB > 1 KiB limit


@pytest.mark.parametrize(
    ("pieces", "status", "closes", "headers"),
    [
        pytest.param([b"GARBAGE\r\n\r\n"], 400, True, {}, id="garbage"),
        pytest.param(
            [b"GET /events HTTP/1.1\r\nHost: x\r\nno colon in this line\r\n\r\n"],
            400,
            True,
            {},
            id="bad-header-line",
        ),
        pytest.param(
            [b"GET /events HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n"],
            400,
            True,
            {},
            id="space-in-header-name",
        ),
        pytest.param([b"GET /events HTTP/1.1\r\n\r\n"], 400, True, {}, id="http11-without-host"),
        pytest.param(
            [b"GET /ev\xc3\xa9nts HTTP/1.1\r\nHost: x\r\n\r\n"],
            400,
            True,
            {},
            id="non-ascii-target",
        ),
        pytest.param(
            [BIG_REQUEST],
            431,
            True,
            {},
            id="head-too-large-one-write",
        ),
        pytest.param(
            [BIG_REQUEST[i : i + 512] for i in range(0, len(BIG_REQUEST), 512)],
            431,
            True,
            {},
            id="head-too-large-in-pieces",
        ),
        pytest.param([request("GET", "/nope")], 404, False, {}, id="unknown-path"),
        *[
            pytest.param(
                [request(method, "/events", {"Content-Length": "5"}) + b"hello"],
                405,
                False,
                {"allow": "GET, HEAD, OPTIONS"},
                id=f"{method.lower()}-not-allowed",
            )
            for method in ("POST", "PUT", "DELETE", "PATCH")
        ],
    ],
)
def test_refusals(
    ssefan: SsefanProcess,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    conn: RawConnection,
    pieces: list[bytes],
    status: int,
    closes: bool,
    headers: dict[str, str],
) -> None:
    for piece in pieces:
        try:
            conn.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            break  # refused and closed before the rest was sent: the answer is readable
    response = conn.read_response()
    assert response.status == status, response
    for name, value in headers.items():
        assert response.headers.get(name) == value
    if closes:
        assert response.headers.get("connection") == "close"
        assert conn.wait_closed(5.0) == b""
    else:
        # Keep-alive: the same connection still answers.
        conn.send(request("GET", "/nope-again"))
        assert conn.read_response().status == 404
    assert_still_streaming(stream_upstream, witness)


@pytest.fixture(scope="module")
def impatient(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SsefanProcess, FakeUpstream]]:
    """An ssefan (and its upstream) with a short header_timeout, kept apart: on a
    loaded machine, 0.3 s between connecting and sending would make the other
    tests flaky."""
    upstream = FakeUpstream().start()
    config = multi_route_config(
        upstream, [{"path": "/plain"}], header_timeout=f"{int(HEADER_TIMEOUT * 1000)}ms"
    )
    try:
        with running_config(tmp_path_factory.mktemp("impatient"), config) as proc:
            upstream.wait_connected()
            yield proc, upstream
    finally:
        upstream.close()


@pytest.mark.parametrize(
    "partial",
    [
        pytest.param(b"", id="nothing-sent"),
        pytest.param(b"GET /plain HTTP/1.1\r\nHost: x\r\n", id="head-never-finished"),
    ],
)
def test_header_timeout(impatient: tuple[SsefanProcess, FakeUpstream], partial: bytes) -> None:
    proc, upstream = impatient
    witness = SSEClient(proc.host, proc.port, "/plain")
    started = time.monotonic()  # before connecting: the server's timer starts later
    conn = RawConnection(proc.host, proc.port)
    try:
        conn.send(partial)
        # header_timeout is 0.3 s: a 408 (or a bare close) must come well within 5 s.
        data = conn.wait_closed(5.0)
        assert time.monotonic() - started >= HEADER_TIMEOUT * 0.9, "closed before the timeout"
        if data:
            assert data.startswith(b"HTTP/1.1 408 "), data
        assert_still_streaming(upstream, witness)
    finally:
        conn.close()
        witness.close()


# --------------------------------------------------------------------------- limits


def _connect(proc: SsefanProcess, path: str) -> SSEClient:
    return SSEClient(proc.host, proc.port, path, timeout=5.0)


def _admitted_after_leave(proc: SsefanProcess, path: str, clients: list[SSEClient]) -> None:
    """Close one admitted client; a new one must then be admitted (poll, no sleep)."""
    clients.pop(0).close()
    admitted: list[SSEClient] = []

    def try_once() -> bool:
        client = _connect(proc, path)
        if client.status == 200 and "content-length" not in client.headers:
            admitted.append(client)
            return True
        assert client.status in (200, 503)  # a refusal, either form
        client.close()
        return False

    wait_until(try_once, 5.0, f"a client to be admitted on {path} after one left")
    clients.extend(admitted)


def _assert_refused(proc: SsefanProcess, path: str, *, status: bool = False) -> None:
    """A temporary refusal: by default the retry stream EventSource follows;
    with `refuse: status`, a plain 503 with Retry-After."""
    refused = get_stream(proc.host, proc.port, path)
    if status:
        assert refused.status == 503
        assert refused.headers["retry-after"].isdigit()
        assert int(refused.headers["retry-after"]) > 0
    else:
        assert refusal_of(refused)["reason"] == "max_clients"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/limited", False, id="retry-stream"),
        pytest.param("/limited-status", True, id="refuse-status"),
    ],
)
def test_route_max_clients(
    ssefan: SsefanProcess,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    path: str,
    status: bool,
) -> None:
    clients = [_connect(ssefan, path) for _ in range(2)]
    try:
        assert [c.status for c in clients] == [200, 200]
        _assert_refused(ssefan, path, status=status)
        # The cap is per route: another route still admits.
        other = _connect(ssefan, "/plain")
        other.close()
        assert other.status == 200
        _admitted_after_leave(ssefan, path, clients)
        _assert_refused(ssefan, path, status=status)
        assert_still_streaming(stream_upstream, witness)
        for client in clients:
            assert_still_streaming(stream_upstream, client)
    finally:
        for client in clients:
            client.close()


def test_global_max_clients(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = multi_route_config(upstream, [{"path": "/a"}, {"path": "/b"}], max_clients=3)
    with running_config(tmp_path, config) as proc:
        upstream.wait_connected(2)
        clients = [_connect(proc, "/a"), _connect(proc, "/a"), _connect(proc, "/b")]
        try:
            assert [c.status for c in clients] == [200, 200, 200]
            _assert_refused(proc, "/a")
            _assert_refused(proc, "/b")
            _admitted_after_leave(proc, "/b", clients)
            _assert_refused(proc, "/a")
            for client in clients:
                assert_still_streaming(upstream, client)
        finally:
            for client in clients:
                client.close()


# --------------------------------------------------------------------------- CORS

PREFLIGHT = {
    "Access-Control-Request-Method": "GET",
    "Access-Control-Request-Headers": "last-event-id",
}


def _tokens(value: str) -> set[str]:
    return {token.strip().lower() for token in value.split(",") if token.strip()}


@pytest.mark.parametrize(
    ("method", "path", "origin", "status", "expected", "absent"),
    [
        pytest.param(
            "OPTIONS",
            "/cors-star",
            OTHER_ORIGIN,
            204,
            {"access-control-allow-origin": "*", "access-control-max-age": "120"},
            ["access-control-allow-credentials"],
            id="preflight-star",
        ),
        pytest.param(
            "OPTIONS",
            "/cors-cred",
            ALLOWED_ORIGIN,
            204,
            {
                "access-control-allow-origin": ALLOWED_ORIGIN,
                "access-control-allow-credentials": "true",
                "vary": "Origin",
                "access-control-max-age": "600",
            },
            [],
            id="preflight-credentials",
        ),
        pytest.param(
            "OPTIONS",
            "/cors-cred",
            OTHER_ORIGIN,
            403,
            {},
            ["access-control-allow-origin", "access-control-allow-methods"],
            id="preflight-disallowed-origin",
        ),
        pytest.param(
            "GET",
            "/cors-star",
            OTHER_ORIGIN,
            200,
            {"access-control-allow-origin": "*"},
            ["access-control-allow-credentials", "vary"],
            id="stream-star",
        ),
        pytest.param(
            "GET",
            "/cors-cred",
            ALLOWED_ORIGIN,
            200,
            {
                "access-control-allow-origin": ALLOWED_ORIGIN,
                "access-control-allow-credentials": "true",
                "vary": "Origin",
            },
            [],
            id="stream-credentials",
        ),
        pytest.param(
            "GET",
            "/cors-cred",
            OTHER_ORIGIN,
            403,
            {},
            ["access-control-allow-origin"],
            id="stream-disallowed-origin",
        ),
    ],
)
def test_cors(
    ssefan: SsefanProcess,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    conn: RawConnection,
    method: str,
    path: str,
    origin: str,
    status: int,
    expected: dict[str, str],
    absent: list[str],
) -> None:
    headers = {"Origin": origin, **(PREFLIGHT if method == "OPTIONS" else {})}
    conn.send(request(method, path, headers))
    response = conn.read_head() if status == 200 else conn.read_response()
    assert response.status == status, response
    for name, value in expected.items():
        assert response.headers.get(name) == value, (name, response.headers)
    for name in absent:
        assert name not in response.headers, (name, response.headers)
    if method == "OPTIONS" and status == 204:
        assert "get" in _tokens(response.headers["access-control-allow-methods"])
        assert _tokens(response.headers["access-control-allow-headers"]) >= {
            "last-event-id",
            "cache-control",
            "authorization",
        }
    if status == 200:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert_still_streaming(stream_upstream, witness)


@pytest.mark.parametrize("method", ["GET", "OPTIONS"])
def test_no_cors_headers_without_cors_config(conn: RawConnection, method: str) -> None:
    headers = {"Origin": OTHER_ORIGIN, **(PREFLIGHT if method == "OPTIONS" else {})}
    conn.send(request(method, "/plain", headers))
    response = conn.read_head()
    assert response.status in (200, 204)
    assert not [name for name in response.headers if name.startswith("access-control-")]


def test_tcp_reset_does_not_disturb(
    ssefan: SsefanProcess, stream_upstream: FakeUpstream, witness: SSEClient
) -> None:
    """A client that resets mid-request (SO_LINGER 0) is a non-event for others."""
    sock = socket.create_connection((ssefan.host, ssefan.port))
    sock.sendall(b"GET /events HTTP/1.1\r\nHo")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    assert_still_streaming(stream_upstream, witness)


# --------------------------------------------------------------------------- bodies we don't read


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(
            b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n", id="404-length"
        ),
        pytest.param(
            b"PUT /events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
            id="405-chunked",
        ),
        pytest.param(
            b"OPTIONS /plain HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc",
            id="204-preflight",
        ),
    ],
)
def test_a_body_still_coming_after_the_answer_is_not_waited_for(
    ssefan: SsefanProcess,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    conn: RawConnection,
    head: bytes,
) -> None:
    """Slowloris on a body nobody reads: the answer arrives whole, then the
    connection ends (lingering close) instead of waiting for the body forever."""
    conn.send(head)
    response = conn.read_head()
    assert response.status in (204, 404, 405), response
    # Nothing else would end it: the head timer stops at the head, and the
    # keep-alive timer starts only after a whole request. Lingering takes 2 s.
    conn.wait_closed(5.0)
    assert_still_streaming(stream_upstream, witness)


# --------------------------------------------------------------------------- path spellings


@pytest.mark.parametrize(
    "target",
    ["/%70lain", "/plain/", "//plain", "/plain;v=1", "/x/../plain", "/%2E%2E/plain", "/./plain//"],
)
def test_spellings_of_a_route_path_are_the_route(conn: RawConnection, target: str) -> None:
    conn.send(request("HEAD", target))
    response = conn.read_response(head_only=True)
    assert response.status == 200, response
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"


@pytest.mark.parametrize("target", ["/plainx", "/pla", "/plain/x", "/x/plain", "/%2e%2e"])
def test_other_paths_are_not_the_route(conn: RawConnection, target: str) -> None:
    conn.send(request("GET", target))
    assert conn.read_response().status == 404
