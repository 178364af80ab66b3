"""Pass-through to a real app on loopback (tests/support/app_server.py, stdlib http.server).

Every request that is not a stream route goes to `app`: bodies both ways
without buffering, keep-alive pooling, hop-by-hop headers dropped,
X-Forwarded-* per `trusted_proxies`, the failure answers (502, 504, 413) and a
WebSocket tunnel. One ssefan (module scope) serves most tests; trusted-peer
and app-down settings need processes of their own.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import h11
import httpx
import pytest
from app_server import TestApp, pattern
from faults import free_port
from raw_http import RawConnection, Response, http_request
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, VerboseSsefan, stop_clean, write_config
from waits import DEFAULT_TIMEOUT, wait_until
from ws_frames import read_ws_frame, recv_exactly, ws_accept, ws_frame

import ssefan.edge.proxy as proxy_module
from ssefan.config import parse_config
from ssefan.http.forwarding import (
    TargetRedactor,
    TrustedProxies,
    describe_h11_error,
    request_id_from,
    strip_hop_by_hop,
)
from ssefan.ops.app import App

MiB = 1024 * 1024
MAX_BODY = 2 * MiB
FIRST_BYTE_TIMEOUT = 1.0
IDLE_TIMEOUT = 2.0
PROXY = {
    "connect_timeout": "2s",
    "first_byte_timeout": f"{FIRST_BYTE_TIMEOUT:g}s",
    "idle_timeout": f"{IDLE_TIMEOUT:g}s",
    "max_body_bytes": "2MiB",
    "pool_size": 4,
    "pool_idle_timeout": "30s",
}
REQUEST_ID = re.compile(r"[0-9a-f]{16}")


def _start(
    tmp_path_factory: pytest.TempPathFactory, app_url: str, upstream: FakeUpstream, **top: object
) -> SsefanProcess:
    config = {
        "listen": "127.0.0.1:0",
        "app": app_url,
        "proxy": PROXY,
        **top,
        "routes": [{"path": "/events", "upstream": upstream.url}],
    }
    path = write_config(tmp_path_factory.mktemp("proxy") / "ssefan.yaml", config)
    return VerboseSsefan(path).start()


@pytest.fixture(scope="module")
def ssefan(
    app: TestApp, stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    """127.0.0.1 is a trusted front proxy here."""
    proc = _start(tmp_path_factory, app.url, stream_upstream, trusted_proxies=["127.0.0.0/8"])
    try:
        yield proc
    finally:
        stop_clean(proc)


POOL_SIZE = 2
POOL_IDLE_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def ssefan_other(
    app: TestApp, stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    """127.0.0.1 is not trusted here; a small pool, quick idle expiry, big bodies."""
    proxy = {
        **PROXY,
        "pool_size": POOL_SIZE,
        "pool_idle_timeout": f"{POOL_IDLE_TIMEOUT:g}s",
        "max_body_bytes": "256MiB",
    }
    proc = _start(
        tmp_path_factory, app.url, stream_upstream, trusted_proxies=["10.0.0.0/8"], proxy=proxy
    )
    try:
        yield proc
    finally:
        stop_clean(proc)


def request(
    method: str, target: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: ssefan.test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def get(proc: SsefanProcess, target: str, headers: dict[str, str] | None = None) -> Response:
    return http_request(
        proc.host, proc.port, request("GET", target, {**(headers or {}), "Connection": "close"})
    )


def echoed(response: Response) -> dict[str, object]:
    assert response.status == 200, (response.status, response.body[:200])
    data = json.loads(response.body)
    assert isinstance(data, dict)
    return data


def echoed_headers(response: Response) -> dict[str, str]:
    """The request headers the app saw (lower-case names, one value each)."""
    seen: dict[str, str] = {}
    for name, value in echoed(response)["headers"]:  # type: ignore[attr-defined]
        assert name.lower() not in seen, f"{name} arrived twice"
        seen[name.lower()] = value
    return seen


# --------------------------------------------------------------------------- bodies


def _pieces(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize(
    ("method", "size", "chunked"),
    [
        pytest.param("GET", 0, False, id="get-0B"),
        pytest.param("POST", 0, False, id="post-0B"),
        pytest.param("POST", MiB, False, id="post-1MiB"),
        pytest.param("PUT", MiB + 7, True, id="put-1MiB-chunked"),
    ],
)
def test_request_reaches_the_app_as_sent(
    ssefan: SsefanProcess, method: str, size: int, chunked: bool
) -> None:
    body = pattern(size)
    content = _pieces(body) if chunked else body
    with httpx.Client(base_url=ssefan.url, timeout=DEFAULT_TIMEOUT) as client:
        response = client.request(
            method, "/echo/deep?x=1&y=%20z", content=content, headers={"X-Case": method}
        )
    assert response.status_code == 200, response.text
    echo = response.json()
    assert (echo["method"], echo["target"]) == (method, "/echo/deep?x=1&y=%20z")
    assert echo["body_length"] == size
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    seen = {name.lower(): value for name, value in echo["headers"]}
    assert seen["x-case"] == method
    if chunked:
        # The body length was unknown up front: it went on chunked, not buffered to count it.
        assert seen["transfer-encoding"] == "chunked"
        assert "content-length" not in seen


def test_large_response_streams_through_intact(ssefan: SsefanProcess) -> None:
    size = 8 * MiB + 3
    with (
        httpx.Client(base_url=ssefan.url, timeout=DEFAULT_TIMEOUT) as client,
        client.stream("GET", f"/bytes?n={size}") as response,
    ):
        assert response.headers["content-length"] == str(size)
        data = b"".join(response.iter_bytes())
    assert data == pattern(size)


def test_streaming_response_is_forwarded_as_it_comes(ssefan: SsefanProcess, app: TestApp) -> None:
    gate = app.gates["stream"]
    gate.clear()
    with (
        httpx.Client(base_url=ssefan.url, timeout=DEFAULT_TIMEOUT) as client,
        client.stream("GET", "/stream") as response,
    ):
        chunks = response.iter_raw()
        got = b""
        while b"part-1\n" not in got:
            got += next(chunks)
        # The app holds part 2 until the gate opens: part 1 was not held back.
        assert b"part-2" not in got
        gate.set()
        got += b"".join(chunks)
    assert got == b"part-1\npart-2\n"


def test_event_stream_from_the_app_is_unbuffered(ssefan: SsefanProcess, app: TestApp) -> None:
    gate = app.gates["sse"]
    gate.clear()
    with (
        httpx.Client(base_url=ssefan.url, timeout=DEFAULT_TIMEOUT) as client,
        client.stream("GET", "/sse") as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["cache-control"] == "no-cache"
        chunks = response.iter_raw()
        got = b""
        while b"\n\n" not in got:
            got += next(chunks)
        assert got == b"data: one\n\n"
        gate.set()
        got += b"".join(chunks)
    assert got == b"data: one\n\ndata: two\n\n"


# --------------------------------------------------------------------------- keep-alive


def test_app_connections_are_pooled_and_reused(ssefan: SsefanProcess, app: TestApp) -> None:
    # Five clients one after another, each on its own connection to ssefan...
    ids = [echoed(get(ssefan, f"/echo?pool={i}"))["connection"] for i in range(5)]
    # ...and three requests on one keep-alive client connection.
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        for i in range(3):
            conn.send(request("GET", f"/echo?keepalive={i}"))
            ids.append(echoed(conn.read_response())["connection"])
    finally:
        conn.close()
    assert len(set(ids)) == 1, f"the app saw connections {ids}"


def test_pipelined_and_head_requests_keep_the_client_connection_in_step(
    ssefan: SsefanProcess,
) -> None:
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        # Two requests in one write: the second waits in ssefan, not lost.
        conn.send(
            request("GET", "/echo?pipelined=1") + request("POST", "/echo?pipelined=2", body=b"xy")
        )
        first, second = echoed(conn.read_response()), echoed(conn.read_response())
        assert (first["target"], second["target"]) == ("/echo?pipelined=1", "/echo?pipelined=2")
        assert second["body_length"] == 2
        conn.send(request("HEAD", "/echo?head"))
        head = conn.read_response(head_only=True)
        assert head.status == 200 and int(head.headers["content-length"]) > 0
        conn.send(request("GET", "/echo?after-head"))
        assert echoed(conn.read_response())["target"] == "/echo?after-head"
        assert conn.buf == b"", "no body may follow the answer to HEAD"
    finally:
        conn.close()


def test_expect_100_continue_is_relayed(ssefan: SsefanProcess) -> None:
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(
            b"POST /echo?expect HTTP/1.1\r\nHost: ssefan.test\r\n"
            b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        # The body is held back until the app (through ssefan) says go on.
        assert conn.read_head().status == 100
        conn.send(b"hello")
        echo = echoed(conn.read_response())
    finally:
        conn.close()
    assert echo["body_length"] == 5


def test_http10_client_gets_a_close_delimited_body(ssefan: SsefanProcess, app: TestApp) -> None:
    app.gates["sse"].set()  # the app's chunked stream, all at once
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(b"GET /sse HTTP/1.0\r\nHost: ssefan.test\r\n\r\n")
        head = conn.read_head()
        body = conn.buf + conn.wait_closed()
    finally:
        conn.close()
    assert head.status == 200
    assert "transfer-encoding" not in head.headers  # HTTP/1.0 has no chunked framing
    assert body == b"data: one\n\ndata: two\n\n"


def test_stale_pooled_connection_is_retried_for_a_bodiless_get(
    ssefan: SsefanProcess, app: TestApp
) -> None:
    pooled = echoed(get(ssefan, "/echo?prime=get"))["connection"]
    response = get(ssefan, "/close-on-reuse?case=get")
    assert response.status == 200, response.body
    attempts = [r for r in app.seen("/close-on-reuse") if r.target.endswith("case=get")]
    # First on the pooled connection (closed unanswered), then once on a new one.
    assert [(r.connection == pooled, r.nth_on_connection > 1) for r in attempts] == [
        (True, True),
        (False, False),
    ]


@pytest.mark.parametrize("when", ["at-once", "later"])
def test_stray_bytes_from_the_app_never_answer_another_request(
    ssefan: SsefanProcess, app: TestApp, when: str
) -> None:
    gate = app.gates["stray"]
    gate.clear()
    target = f"/stray?{when}-{time.monotonic_ns()}"
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(request("GET", target))
        assert conn.read_response().body == b"answered\n"
        # Now pooled (or already dropped, if the stray bytes came with the answer).
        gate.set()
        [stray] = [r for r in app.seen("/stray") if r.target == target]
        wait_until(lambda: stray.connection in app.closed_at, what="ssefan to drop it")
        for i in range(3):
            conn.send(request("GET", f"/echo?after-stray={i}"))
            assert echoed(conn.read_response())["target"] == f"/echo?after-stray={i}"
    finally:
        gate.set()
        conn.close()


def test_stale_pooled_connection_is_not_retried_with_a_body(
    ssefan: SsefanProcess, app: TestApp
) -> None:
    echoed(get(ssefan, "/echo?prime=post"))
    response = http_request(
        ssefan.host,
        ssefan.port,
        request("POST", "/close-on-reuse?case=post", {"Connection": "close"}, b"payload"),
    )
    assert response.status == 502, response.body
    assert [r.target for r in app.seen("/close-on-reuse")].count("/close-on-reuse?case=post") == 1


def test_pool_keeps_pool_size_idle_connections_until_they_expire(
    ssefan_other: SsefanProcess, app: TestApp
) -> None:
    gate = app.gates["stream"]
    gate.clear()
    tag = f"pool-{time.monotonic_ns()}"
    conns = [RawConnection(ssefan_other.host, ssefan_other.port) for _ in range(POOL_SIZE + 2)]
    try:
        for i, conn in enumerate(conns):
            conn.send(request("GET", f"/stream?{tag}={i}"))
        for conn in conns:
            conn.read_until(b"part-1\n")  # every exchange holds its own app connection
        ids = {r.connection for r in app.seen("/stream") if tag in r.target}
        assert len(ids) == len(conns)
        released = time.monotonic()
        gate.set()
        for conn in conns:
            conn.read_until(b"0\r\n\r\n")
    finally:
        for conn in conns:
            conn.close()
    wait_until(lambda: ids <= app.closed_at.keys(), what="every app connection closed")
    closed = sorted(app.closed_at[i] - released for i in ids)
    # Those beyond pool_size are closed as their exchange ends; the pooled ones
    # when they have been idle for pool_idle_timeout.
    assert closed[1] < POOL_IDLE_TIMEOUT * 0.8, closed
    assert closed[POOL_SIZE] >= POOL_IDLE_TIMEOUT * 0.9, closed


def settled(counter: Callable[[], int], quiet: float = 0.3) -> int:
    """The value `counter` stops at (unchanged for `quiet` seconds)."""
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    value, since = counter(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, f"still moving after {DEFAULT_TIMEOUT}s: {value}"
        time.sleep(0.02)
        if counter() != value:
            value, since = counter(), time.monotonic()
    return value


BACKPRESSURE_SIZE = 64 * MiB


def test_a_client_that_stops_reading_holds_the_app_back(
    ssefan: SsefanProcess, app: TestApp
) -> None:
    target = f"/bytes?n={BACKPRESSURE_SIZE}&case=download"
    sock = socket.create_connection((ssefan.host, ssefan.port), timeout=DEFAULT_TIMEOUT)
    try:
        sock.sendall(request("GET", target))
        wait_until(lambda: bool(app.seen("/bytes")) and app.seen("/bytes")[-1].target == target)
        stalled_at = settled(lambda: app.written.get(target, 0))
        # Without backpressure ssefan would take it all into memory.
        assert stalled_at <= BACKPRESSURE_SIZE // 2, stalled_at
        received = bytearray()
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, body = bytes(received).partition(b"\r\n\r\n")
        received[:] = body
        view = bytearray(1024 * 1024)
        while len(received) < BACKPRESSURE_SIZE:
            n = sock.recv_into(view)
            assert n, f"closed after {len(received)} bytes"
            received += view[:n]
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 200 ")
    assert received == pattern(BACKPRESSURE_SIZE)


def test_an_app_that_stops_reading_holds_the_upload_back(
    ssefan_other: SsefanProcess, app: TestApp
) -> None:
    gate = app.gates["sink"]
    gate.clear()
    sent = 0
    piece = pattern(MiB)
    sock = socket.create_connection((ssefan_other.host, ssefan_other.port), timeout=None)

    def upload() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            sock.sendall(
                b"POST /sink HTTP/1.1\r\nHost: ssefan.test\r\n"
                b"Content-Length: %d\r\n\r\n" % BACKPRESSURE_SIZE
            )
            for _ in range(BACKPRESSURE_SIZE // MiB):
                sock.sendall(piece)
                sent += len(piece)

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        stalled_at = settled(lambda: sent)
        # Without backpressure ssefan would read it all into memory.
        assert stalled_at <= BACKPRESSURE_SIZE // 2, stalled_at
        gate.set()
        uploader.join(DEFAULT_TIMEOUT)
        assert sent == BACKPRESSURE_SIZE
        sock.settimeout(DEFAULT_TIMEOUT)
        received = b""
        while not received.endswith(str(BACKPRESSURE_SIZE).encode()):
            data = sock.recv(65536)
            assert data, f"closed; got {received!r}"
            received += data
    finally:
        gate.set()
        sock.close()
    assert received.startswith(b"HTTP/1.1 200 ")


# --------------------------------------------------------------------------- headers


def test_hop_by_hop_headers_are_dropped_both_ways(ssefan: SsefanProcess) -> None:
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(
            request(
                "GET",
                "/echo?hop",
                {
                    "Connection": "keep-alive, X-Drop-Me",
                    "X-Drop-Me": "named-in-connection",
                    "Keep-Alive": "timeout=300",
                    "Proxy-Connection": "keep-alive",
                    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
                    "TE": "trailers",
                    "Trailer": "X-Checksum",
                    "Upgrade": "h2c",
                    "X-End-To-End": "kept",
                },
            )
        )
        seen = echoed_headers(conn.read_response())
        dropped = {
            "connection",
            "x-drop-me",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
        }
        assert dropped.isdisjoint(seen), dropped & set(seen)
        assert seen["x-end-to-end"] == "kept"
        conn.send(request("GET", "/hop"))
        response = conn.read_response()
    finally:
        conn.close()
    assert response.status == 200
    dropped = {"connection", "x-hop-secret", "keep-alive", "proxy-authenticate", "trailer"}
    assert dropped.isdisjoint(response.headers), dropped & set(response.headers)
    assert "upgrade" not in response.headers
    assert response.headers["x-end-to-end"] == "kept"
    assert response.body == b"hop\n"


CLAIMS = {
    "X-Forwarded-For": "203.0.113.9",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "public.example",
    "Forwarded": "for=203.0.113.9;proto=https",
}


def test_x_forwarded_from_a_trusted_peer_are_extended(ssefan: SsefanProcess) -> None:
    seen = echoed_headers(get(ssefan, "/echo?xf=trusted", CLAIMS))
    assert seen["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https, http"
    assert seen["x-forwarded-host"] == "public.example, ssefan.test"
    assert seen["forwarded"] == CLAIMS["Forwarded"]


def test_x_forwarded_from_anyone_else_are_replaced(ssefan_other: SsefanProcess) -> None:
    seen = echoed_headers(get(ssefan_other, "/echo?xf=untrusted", CLAIMS))
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "ssefan.test"
    assert "forwarded" not in seen


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param(None, False, id="none-sent"),
        pytest.param("4bf92f35-77b3-4da6-a3ce-929d0e0e4736", True, id="uuid-kept"),
        pytest.param("<script> with spaces", False, id="junk-replaced"),
    ],
)
def test_request_id_is_sent_to_the_app(ssefan: SsefanProcess, sent: str | None, kept: bool) -> None:
    headers = {"X-Request-ID": sent} if sent is not None else {}
    seen = echoed_headers(get(ssefan, "/echo?rid", headers))
    if kept:
        assert seen["x-request-id"] == sent
    else:
        assert REQUEST_ID.fullmatch(seen["x-request-id"]), seen["x-request-id"]


def test_stream_routes_are_served_not_proxied(ssefan: SsefanProcess, app: TestApp) -> None:
    client = SSEClient(ssefan.host, ssefan.port, "/events")
    try:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
    finally:
        client.close()
    assert app.seen("/events") == []


# --------------------------------------------------------------------------- failures


def _logged(proc: SsefanProcess, request_id: str, status: int) -> None:
    wait_until(
        lambda: any(
            f"request={request_id}" in line and f"-> {status}" in line for line in proc.lines
        ),
        what=f"a log line for request {request_id} -> {status}",
    )


def _request_id_of(response: Response) -> str:
    request_id = response.headers["x-request-id"]
    assert f"(request {request_id})" in response.body.decode()
    return request_id


def test_app_down_is_502(
    stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proc = _start(tmp_path_factory, f"http://127.0.0.1:{free_port()}", stream_upstream)
    try:
        response = get(proc, "/anything")
        assert response.status == 502
        assert response.body.startswith(b"502 the app is unreachable")
        _logged(proc, _request_id_of(response), 502)
    finally:
        stop_clean(proc)


def test_app_slow_to_answer_is_504(ssefan: SsefanProcess) -> None:
    started = time.monotonic()
    response = get(ssefan, "/slow")
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert response.body.startswith(b"504 the app did not answer within 1s")
    assert FIRST_BYTE_TIMEOUT * 0.9 <= elapsed < FIRST_BYTE_TIMEOUT + 3
    _logged(ssefan, _request_id_of(response), 504)


def test_app_going_silent_mid_response_cuts_the_client(ssefan: SsefanProcess, app: TestApp) -> None:
    gate = app.gates["stream"]
    gate.clear()
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(request("GET", "/stream?silent"))
        head = conn.read_head()
        assert head.status == 200 and head.headers["transfer-encoding"] == "chunked"
        started = time.monotonic()
        rest = conn.buf + conn.wait_closed(timeout=IDLE_TIMEOUT + 5)
        assert time.monotonic() - started >= IDLE_TIMEOUT * 0.9
    finally:
        conn.close()
        gate.set()
    # Part 1, and no terminal chunk: the client can tell the body is incomplete.
    assert rest == b"7\r\npart-1\n\r\n"
    wait_until(lambda: "went silent for 2s" in ssefan.log_text(), what="the idle log line")


def test_declared_body_over_the_limit_is_413_without_asking_the_app(
    ssefan: SsefanProcess, app: TestApp
) -> None:
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(
            b"POST /echo?case=413-declared HTTP/1.1\r\nHost: ssefan.test\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        response = conn.read_response()
        assert response.status == 413
        assert b"over the 2097152-byte limit" in response.body
        assert response.headers["connection"] == "close"
        conn.wait_closed()
    finally:
        conn.close()
    assert not [r for r in app.requests if r.target == "/echo?case=413-declared"]


def test_chunked_body_over_the_limit_is_413_then_closed(ssefan: SsefanProcess) -> None:
    sock = socket.create_connection((ssefan.host, ssefan.port), timeout=DEFAULT_TIMEOUT)
    piece = pattern(256 * 1024)
    chunk = b"%x\r\n%b\r\n" % (len(piece), piece)

    def upload() -> None:
        # Like a real uploader, it keeps sending past the limit, unaware.
        with contextlib.suppress(OSError):
            sock.sendall(
                b"POST /echo?case=413-chunked HTTP/1.1\r\nHost: ssefan.test\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for _ in range(2 * MAX_BODY // len(piece)):
                sock.sendall(chunk)

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    finally:
        uploader.join(DEFAULT_TIMEOUT)
        sock.close()
    # The answer arrives whole (not destroyed by a reset over the unread
    # upload), and then the connection ends.
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), received[:200]
    assert b"request body is over the 2097152-byte limit" in body


# --------------------------------------------------------------------------- upgrade


def test_websocket_is_tunneled_byte_for_byte(ssefan: SsefanProcess) -> None:
    key = base64.b64encode(os.urandom(16))
    sock = socket.create_connection((ssefan.host, ssefan.port), timeout=DEFAULT_TIMEOUT)
    try:
        handshake = (
            b"GET /ws HTTP/1.1\r\nHost: ssefan.test\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        # A first frame right behind the handshake, in the same packet.
        sock.sendall(handshake + ws_frame(0x1, b"early", mask=True))
        buffer = bytearray()
        read = recv_exactly(sock, buffer)
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            assert data, f"closed before the 101: {bytes(buffer)!r}"
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101 ")
        headers = {
            k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])
        }
        assert headers["upgrade"] == "websocket"
        assert headers["connection"].lower() == "upgrade"
        assert headers["sec-websocket-accept"] == ws_accept(key)
        assert read_ws_frame(read) == (0x1, b"hello")  # came with the app's 101
        assert read_ws_frame(read) == (0x1, b"early")
        for opcode, payload in [(0x1, b"x"), (0x2, pattern(300)), (0x2, pattern(200_000))]:
            sock.sendall(ws_frame(opcode, payload, mask=True))
            assert read_ws_frame(read) == (opcode, payload)
        sock.sendall(ws_frame(0x8, b"\x03\xe8", mask=True))
        assert read_ws_frame(read) == (0x8, b"\x03\xe8")
        assert read(1) == b"", "the tunnel closes after the app closes"
    finally:
        sock.close()


# --------------------------------------------------------------------------- header rules


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        pytest.param(
            [(b"Connection", b"close, X-Foo"), (b"X-Foo", b"1"), (b"X-Bar", b"2")],
            [(b"X-Bar", b"2")],
            id="named-in-connection",
        ),
        pytest.param(
            [(b"connection", b"keep-alive"), (b"Connection", b" X-A "), (b"x-a", b"1")],
            [],
            id="repeated-connection-headers",
        ),
        pytest.param(
            [
                (b"Transfer-Encoding", b"chunked"),
                (b"TE", b"trailers"),
                (b"Trailer", b"X-Sum"),
                (b"Upgrade", b"h2c"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Proxy-Connection", b"keep-alive"),
                (b"Proxy-Authorization", b"Basic eA=="),
                (b"Proxy-Authenticate", b"Basic"),
                (b"Content-Length", b"3"),
            ],
            [(b"Content-Length", b"3")],
            id="rfc9110-list",
        ),
    ],
)
def test_strip_hop_by_hop(
    headers: list[tuple[bytes, bytes]], kept: list[tuple[bytes, bytes]]
) -> None:
    assert strip_hop_by_hop(headers) == kept


@pytest.mark.parametrize(
    ("cidrs", "peer", "trusted"),
    [
        pytest.param(["127.0.0.1"], "127.0.0.1", True, id="single-ip"),
        pytest.param(["10.0.0.0/8"], "10.1.2.3", True, id="in-cidr"),
        pytest.param(["10.0.0.0/8"], "11.0.0.1", False, id="outside-cidr"),
        pytest.param(["10.0.0.0/8"], "::ffff:10.0.0.1", True, id="v4-mapped-v6"),
        pytest.param(["fd00::/8"], "fd12::1", True, id="ipv6"),
        pytest.param(["fe80::/10"], "fe80::1%eth0", True, id="ipv6-scoped"),
        pytest.param([], "127.0.0.1", False, id="none-trusted"),
        pytest.param(["10.0.0.0/8"], "", False, id="unknown-peer"),
    ],
)
def test_trusted_proxies(cidrs: list[str], peer: str, trusted: bool) -> None:
    assert (peer in TrustedProxies(cidrs)) is trusted


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        pytest.param("/p?token=abc&x=1", "/p?token=***&x=1", id="configured-param"),
        pytest.param("/p?access_token=abc", "/p?access_token=***", id="rfc6750-param"),
        pytest.param("/p?tokens=1&x=token", "/p?tokens=1&x=token", id="lookalikes-kept"),
        pytest.param("/p/token/abc", "/p/token/abc", id="no-query"),
        pytest.param("/" + "a" * 300, "/" + "a" * 255 + "...", id="long-target-cut"),
    ],
)
def test_logged_targets_are_redacted(target: str, logged: str) -> None:
    assert TargetRedactor(["token"])(target) == logged


def test_h11_errors_are_described_without_the_offending_bytes() -> None:
    error = RuntimeError("illegal header line: bytearray(b'Cookie: session=s3cret')")
    assert describe_h11_error(error) == "illegal header line (value not shown)"
    assert describe_h11_error(RuntimeError("no quotes here")) == "no quotes here"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param([], None, id="none"),
        pytest.param([b"abc-123"], "abc-123", id="token"),
        pytest.param([b"a b"], None, id="space"),
        pytest.param([b"x" * 129], None, id="too-long"),
        pytest.param([b"a", b"b"], None, id="two-values"),
    ],
)
def test_request_id_from_the_client(sent: list[bytes], kept: str | None) -> None:
    assert request_id_from([(b"X-Request-ID", value) for value in sent]) == kept


# --------------------------------------------------------------------------- framing


def test_app_response_with_both_lengths_is_relayed_by_transfer_encoding(
    ssefan: SsefanProcess,
) -> None:
    """RFC 9112 §6.3: the app's Transfer-Encoding wins over its Content-Length,
    and the stale length must not reach the client (h11 refused the mismatch:
    an ERROR traceback and a cut body)."""
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(request("GET", "/clte"))
        head = conn.read_head()
        assert head.status == 200
        assert "content-length" not in head.headers
        assert head.headers["transfer-encoding"] == "chunked"
        conn.read_until(b"0\r\n\r\n")
        assert conn.buf == b"a\r\n0123456789\r\n0\r\n\r\n"
        conn.buf = b""
        # Framed right, the connection stays in step for the next request.
        conn.send(request("GET", "/echo?after-clte"))
        assert echoed(conn.read_response())["target"] == "/echo?after-clte"
    finally:
        conn.close()
    bad = [line for line in ssefan.lines if "level=error" in line.lower() or "Traceback" in line]
    assert not bad, bad


SMUGGLED = b"GET /echo?smuggled HTTP/1.1\r\nHost: ssefan.test\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "target"),
    [("POST", "/echo?case=cl-te"), ("POST", "/events"), ("GET", "/events")],
    ids=["pass-through", "stream-route-post", "stream-route-get"],
)
def test_request_with_both_lengths_is_refused_and_closed(
    ssefan: SsefanProcess, app: TestApp, method: str, target: str
) -> None:
    """Request smuggling: h11 goes by Transfer-Encoding (here, an empty body and
    then a second request), a front proxy by Content-Length. Neither is trusted."""
    body = b"0\r\n\r\n" + SMUGGLED
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(
            f"{method} {target} HTTP/1.1\r\nHost: ssefan.test\r\n".encode()
            + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(body)
            + body
        )
        response = conn.read_response()
        assert response.status == 400, response
        assert response.body == b"400 request has both Content-Length and Transfer-Encoding\n"
        assert response.headers["connection"] == "close"
        assert conn.buf + conn.wait_closed() == b""
    finally:
        conn.close()
    assert not [r for r in app.requests if r.target in ("/echo?case=cl-te", "/echo?smuggled")]
    wait_until(lambda: "both Content-Length and Transfer-Encoding" in ssefan.log_text())


@pytest.mark.parametrize("spoiled", ["head", "body"])
def test_a_response_h11_refuses_to_frame_is_a_clean_502_or_cut(
    app: TestApp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    spoiled: str,
) -> None:
    """Defence in depth for whatever else h11 may refuse on the way to the client
    (LocalProtocolError): a 502 while the head is not out, else a cut body; a
    warning either way, never an ERROR traceback. ssefan runs in-process here so
    the relayed headers can be spoiled (no real app can: h11 parsed them)."""
    real = proxy_module._response_headers

    def spoil(response: h11.Response) -> list[tuple[bytes, bytes]]:
        headers = real(response)
        if spoiled == "head":
            return [*headers, (b"X-Spoiled", b"nul\x00byte")]  # h11 won't build this head
        # A length shorter than the body: h11 refuses the body's first bytes.
        return [(n, v) for n, v in headers if n.lower() != b"content-length"] + [
            (b"Content-Length", b"1")
        ]

    monkeypatch.setattr(proxy_module, "_response_headers", spoil)

    async def exchange() -> bytes:
        config = parse_config(f"listen: 127.0.0.1:0\napp: {app.url}\nroutes: []\n", "<test>")
        server = App(config)
        await server.start(announce=False)
        try:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(request("GET", f"/echo?spoiled={spoiled}"))
                async with asyncio.timeout(DEFAULT_TIMEOUT):
                    received = await reader.readuntil(b"\r\n\r\n")
                    if spoiled == "head":  # a whole answer, the connection kept
                        length = re.search(rb"content-length: (\d+)", received)
                        assert length is not None, received
                        return received + await reader.readexactly(int(length[1]))
                    with contextlib.suppress(ConnectionError):  # cut: EOF or reset
                        while data := await reader.read(65536):
                            received += data
                    return received
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
        finally:
            await server.stop()

    with caplog.at_level(logging.WARNING, logger="ssefan"):
        received = asyncio.run(exchange())
    if spoiled == "head":
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), received
        assert body.startswith(b"502 the app's response can't be relayed as HTTP/1.1"), body
    else:
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"", received
    assert [r.levelname for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert any("-> 502" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
