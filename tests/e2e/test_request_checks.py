"""What a request must be before anything routes it (request_checks, paths.variant_path).

The sans-I/O rules are tested as tables; then a real ssefan process in front
of a real app shows the one reading both sides go by: every malformed shape is
answered by ssefan itself (its refusal counter moves), closes the connection,
never reaches the app (a wire tap between ssefan and the app keeps every byte
ssefan sent it), and leaves an open stream flowing. Variants of a protected
route are 404 and never passed through; a drain closes pass-through
connections after their response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import pytest
from app_server import TestApp
from opsharness import admin_url, scrape
from raw_http import RawConnection, Response
from sse_clients import SSEClient, pump_until
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, stop_clean, write_config
from waits import DEFAULT_TIMEOUT, wait_until

from ssefan.config import RouteConfig, parse_config
from ssefan.core.paths import routing_path, variant_path
from ssefan.edge.server import Server
from ssefan.http.forwarding import forwarded_headers
from ssefan.http.request_checks import (
    BadRequest,
    CheckedRequest,
    TargetForm,
    check_request,
    check_target,
    valid_host,
)
from ssefan.ops.app import App

_unique = itertools.count()

# --------------------------------------------------------------------------- unit: valid_host


@pytest.mark.parametrize(
    "host",
    [
        b"example.com",
        b"example.com:8080",
        b"EXAMPLE.com.",
        b"localhost",
        b"127.0.0.1",
        b"127.0.0.1:65535",
        b"[::1]",
        b"[::1]:8080",
        b"[2001:db8::ff00:42:8329]",
        b"a_b~c-d",
        b"x:1",
    ],
)
def test_valid_host_accepts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"a b", id="space"),
        pytest.param(b"evil.example/x?y", id="path-and-query"),
        pytest.param(b"evil.example?y", id="query"),
        pytest.param(b"evil.example#x", id="fragment"),
        pytest.param(b"user@host", id="userinfo"),
        pytest.param(b"a,b", id="comma-splits-x-forwarded-host"),
        pytest.param(b"a;b", id="semicolon-splits-forwarded"),
        pytest.param(b"host:", id="empty-port"),
        pytest.param(b"host:65536", id="port-too-big"),
        pytest.param(b"host:123456", id="port-too-long"),
        pytest.param(b"host:8x", id="port-not-digits"),
        pytest.param(b"host:80:80", id="two-ports"),
        pytest.param(b"::1", id="ipv6-unbracketed"),
        pytest.param(b"[::1", id="ipv6-unclosed"),
        pytest.param(b"[::g]", id="ipv6-invalid"),
        pytest.param(b"[fe80::1%eth0]", id="ipv6-zone"),
        pytest.param(b"[::1]x", id="junk-after-ipv6"),
        pytest.param(b"ex%61mple.com", id="percent-escape"),
        pytest.param("ex\u00e4mple.com".encode(), id="non-ascii"),
        pytest.param(b"a" * 256, id="longer-than-dns"),
    ],
)
def test_valid_host_refuses(host: bytes) -> None:
    assert not valid_host(host)


# --------------------------------------------------------------------------- unit: check_request

HOST = [(b"Host", b"ssefan.test")]


@dataclass(frozen=True)
class Read:
    """What check_request should make of a request it serves."""

    form: TargetForm
    path: str
    query: str
    forward: bytes
    host: bytes | None


@pytest.mark.parametrize(
    ("method", "target", "version", "headers", "expected"),
    [
        pytest.param(
            b"GET",
            b"/events?a=1",
            b"1.1",
            HOST,
            Read(TargetForm.ORIGIN, "/events", "a=1", b"/events?a=1", b"ssefan.test"),
            id="origin-form",
        ),
        pytest.param(
            b"GET",
            b"//events",
            b"1.1",
            HOST,
            Read(TargetForm.ORIGIN, "//events", "", b"//events", b"ssefan.test"),
            id="origin-form-double-slash-is-a-path",
        ),
        pytest.param(
            b"GET",
            b"http://public.example:8080/events?a=1",
            b"1.1",
            [(b"Host", b"other.example")],
            Read(TargetForm.ABSOLUTE, "/events", "a=1", b"/events?a=1", b"public.example:8080"),
            id="absolute-form-authority-wins-over-host",
        ),
        pytest.param(
            b"GET",
            b"HTTPS://public.example",
            b"1.1",
            HOST,
            Read(TargetForm.ABSOLUTE, "/", "", b"/", b"public.example"),
            id="absolute-form-no-path-is-slash",
        ),
        pytest.param(
            b"OPTIONS",
            b"http://public.example",
            b"1.1",
            HOST,
            Read(TargetForm.ASTERISK, "*", "", b"*", b"public.example"),
            id="options-absolute-no-path-is-asterisk",
        ),
        pytest.param(
            b"OPTIONS",
            b"*",
            b"1.1",
            HOST,
            Read(TargetForm.ASTERISK, "*", "", b"*", b"ssefan.test"),
            id="options-asterisk",
        ),
        pytest.param(
            b"GET",
            b"/events",
            b"1.0",
            [],
            Read(TargetForm.ORIGIN, "/events", "", b"/events", None),
            id="http10-without-host",
        ),
        pytest.param(
            b"GET",
            b"/events",
            b"1.1",
            [(b"HOST", b"[::1]:8080")],
            Read(TargetForm.ORIGIN, "/events", "", b"/events", b"[::1]:8080"),
            id="host-any-case-ipv6",
        ),
    ],
)
def test_check_request_serves(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    expected: Read,
) -> None:
    checked = check_request(method, target, version, headers)
    assert isinstance(checked, CheckedRequest), checked
    t = checked.target
    assert Read(t.form, t.path, t.query, t.forward, checked.host) == expected


@pytest.mark.parametrize(
    ("method", "target", "version", "headers", "status"),
    [
        pytest.param(b"GET", b"/events", b"2.0", HOST, 505, id="http2"),
        pytest.param(b"GET", b"/events", b"9.9", HOST, 505, id="http9"),
        pytest.param(b"GET", b"/events", b"1.2", HOST, 505, id="http12"),
        pytest.param(b"GET", b"/events", b"0.9", HOST, 505, id="http09"),
        pytest.param(b"PRI", b"*", b"2.0", [], 505, id="http2-preface"),
        pytest.param(b"CONNECT", b"example.com:443", b"1.1", HOST, 501, id="connect"),
        pytest.param(b"CONNECT", b"/events", b"1.1", HOST, 501, id="connect-path"),
        pytest.param(b"GET", b"events", b"1.1", HOST, 400, id="no-slash"),
        pytest.param(b"GET", b"ftp://x/events", b"1.1", HOST, 400, id="ftp-scheme"),
        pytest.param(b"GET", b"x:/events", b"1.1", HOST, 400, id="scheme-no-authority"),
        pytest.param(b"GET", b"http:/events", b"1.1", HOST, 400, id="http-no-authority"),
        pytest.param(b"GET", b"http:///events", b"1.1", HOST, 400, id="empty-authority"),
        pytest.param(b"GET", b"http://u:p@x/events", b"1.1", HOST, 400, id="userinfo"),
        pytest.param(b"GET", b"http://x:99999/events", b"1.1", HOST, 400, id="bad-port"),
        pytest.param(b"GET", b"/events#x", b"1.1", HOST, 400, id="fragment"),
        pytest.param(b"GET", b"/x#/../events", b"1.1", HOST, 400, id="fragment-dot-dot"),
        pytest.param(b"GET", b"*", b"1.1", HOST, 400, id="asterisk-get"),
        pytest.param(b"GET", "/\u00e9".encode(), b"1.1", HOST, 400, id="non-ascii"),
        pytest.param(b"GET", b"/events", b"1.1", [], 400, id="http11-without-host"),
        pytest.param(b"GET", b"/events", b"1.1", HOST * 2, 400, id="two-hosts"),
        pytest.param(b"GET", b"/events", b"1.0", HOST * 2, 400, id="two-hosts-http10"),
        pytest.param(b"GET", b"/events", b"1.1", [(b"Host", b"a b")], 400, id="host-space"),
        pytest.param(
            b"GET", b"/events", b"1.0", [(b"Host", b"evil.example/x?y")], 400, id="host-path"
        ),
        pytest.param(
            b"GET",
            b"http://ok.example/events",
            b"1.1",
            [(b"Host", b"a b")],
            400,
            id="absolute-form-invalid-host-header",
        ),
    ],
)
def test_check_request_refuses(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
) -> None:
    refused = check_request(method, target, version, headers)
    assert isinstance(refused, BadRequest), refused
    assert refused.status == status
    # The reason is for a log line: it never quotes the request.
    for part in (target, *(value for _, value in headers)):
        if len(part) > 3:
            assert part.decode("latin-1") not in refused.reason


def test_check_target_forwards_what_it_routes() -> None:
    """The pass-through sends exactly the path and query routing looked at."""
    for raw in (b"/a/b?c=d", b"http://h/a/b?c=d", b"https://h:1/a/b?c=d"):
        target = check_target(b"GET", raw)
        assert not isinstance(target, BadRequest)
        assert target.forward == b"/a/b?c=d"
        assert (target.path, target.query) == ("/a/b", "c=d")


# --------------------------------------------------------------------------- unit: variant_path


@pytest.mark.parametrize(
    "path",
    [
        "/EVENTS",
        "/Events",
        "/events%00",
        "/events%0a",
        "/events%0D%0A",
        "/events%09",
        "/ev%e2%80%8bents",  # zero-width space
        "/ev%C2%ADents",  # soft hyphen
        "/%EF%BB%BFevents",  # BOM
        "/events%7f",
        "/EVENTS/",
        "//EVENTS",
        "/%45VENTS",
        "/x/../EVENTS",
        "/EVENTS;jsessionid=1",
        "\\EVENTS",
    ],
)
def test_variant_path_matches_the_route(path: str) -> None:
    assert variant_path(path) == variant_path("/events")


@pytest.mark.parametrize("path", ["/event", "/events2", "/events/x", "/e-vents", "/evénts"])
def test_variant_path_keeps_other_paths_apart(path: str) -> None:
    assert variant_path(path) != variant_path("/events")


def test_variant_path_folds_beyond_ascii() -> None:
    # str.casefold: the long s is an s, as case-insensitive .NET routing takes it.
    assert variant_path("/%C5%BFecure") == variant_path("/secure")


def test_routing_path_is_not_case_folded() -> None:
    # Paths are case-sensitive (RFC 3986 §6.2.2.1): a variant is no route of ours.
    assert routing_path("/EVENTS") != routing_path("/events")


# --------------------------------------------------------------------------- unit: Server tables


@dataclass
class _StubChannel:
    route: RouteConfig


def _route(path: str, **keys: Any) -> RouteConfig:
    config = parse_config(
        f"listen: 127.0.0.1:0\nroutes:\n  - path: {path}\n    upstream: http://127.0.0.1:1/\n",
        "<test>",
    )
    return replace(config.routes[0], **keys)


def test_server_variant_table_follows_the_routes() -> None:
    config = parse_config("listen: 127.0.0.1:0\napp: http://127.0.0.1:1\nroutes: []\n", "<test>")
    channels: dict[str, Any] = {"/events": _StubChannel(_route("/events"))}
    server = Server(config, cast(Any, channels))
    assert server.variant_of("/EVENTS") == "/events"
    assert server.variant_of("/other") is None
    # A reload turns protection off on the kept route (a new RouteConfig, same channel).
    channels["/events"].route = _route("/events", protect_variants=False)
    assert server.variant_of("/EVENTS") is None
    # ... and adds a protected route.
    channels["/Feed"] = _StubChannel(_route("/Feed"))
    assert server.variant_of("/feed") == "/Feed"
    del channels["/Feed"]
    assert server.variant_of("/feed") is None


def _with_upstream(path: str, url: str) -> RouteConfig:
    route = _route(path)
    return replace(route, upstream=replace(route.upstream, url=url))


@pytest.mark.parametrize(
    ("app", "upstream", "protected"),
    [
        pytest.param("http://127.0.0.1:8000", "http://127.0.0.1:8000/internal/stream", True),
        pytest.param("http://LOCALHOST", "http://localhost:80/internal/stream?t=1", True),
        pytest.param("http://127.0.0.1:8000", "http://127.0.0.1:9000/internal/stream", False),
        pytest.param("http://127.0.0.1:8000", "https://127.0.0.1:8000/internal/stream", False),
    ],
)
def test_the_apps_own_stream_endpoint_is_protected(
    app: str, upstream: str, protected: bool
) -> None:
    config = parse_config(f"listen: 127.0.0.1:0\napp: {app}\nroutes: []\n", "<test>")
    channels: dict[str, Any] = {"/events": _StubChannel(_with_upstream("/events", upstream))}
    server = Server(config, cast(Any, channels))
    expected = "/events" if protected else None
    assert server.upstream_path_of("/internal/stream") == expected
    assert server.upstream_path_of("/Internal/Stream%00") == expected  # its variants too
    assert server.upstream_path_of("/internal") is None
    channels["/events"].route = replace(channels["/events"].route, protect_variants=False)
    assert server.upstream_path_of("/internal/stream") is None


def test_an_upstream_that_is_itself_a_route_path_stays_a_route() -> None:
    config = parse_config("listen: 127.0.0.1:0\napp: http://127.0.0.1:8000\nroutes: []\n", "<t>")
    channels: dict[str, Any] = {
        "/events": _StubChannel(_with_upstream("/events", "http://127.0.0.1:8000/events"))
    }
    assert Server(config, cast(Any, channels)).upstream_path_of("/events") is None


# ------------------------------------------------------------------- unit: forwarded headers


@pytest.mark.parametrize("trusted", [True, False])
def test_x_forwarded_host_only_carries_valid_hosts(trusted: bool) -> None:
    headers = [
        (b"Host", b"evil.example/x?y"),
        (b"X-Forwarded-Host", b"front.example, bad host, also/bad"),
        (b"Forwarded", b'for=1.2.3.4;host="evil.example/x"'),
        (b"Forwarded", b'for=1.2.3.4;host="front.example:8443"'),
    ]
    out = forwarded_headers(headers, peer_ip="127.0.0.1", scheme="http", trusted=trusted)
    hosts = [v for n, v in out if n.lower() == b"x-forwarded-host"]
    forwarded = [v for n, v in out if n.lower() == b"forwarded"]
    if trusted:
        assert hosts == [b"front.example"]  # the front proxy's valid claim only
        assert forwarded == [b'for=1.2.3.4;host="front.example:8443"']
    else:
        assert hosts == []
        assert forwarded == []


# --------------------------------------------------------------------------- loopback


class WireTap:
    """A loopback TCP relay in front of the app that keeps every byte ssefan sent it.

    The app (http.server) itself refuses some shapes (HTTP/2.0) without
    recording them: the tap sees what crossed the wire whatever the app did.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._wire = bytearray()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def wire(self) -> bytes:
        with self._lock:
            return bytes(self._wire)

    def start(self) -> WireTap:
        self._spawn(self._accept_loop)
        return self

    def _spawn(self, target: Any, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), DEFAULT_TIMEOUT)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._socks += [client, server]
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(65536):
                if record:
                    with self._lock:
                        self._wire += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(DEFAULT_TIMEOUT)
        for sock in socks:
            sock.close()


@pytest.fixture(scope="module")
def tap(app: TestApp) -> Iterator[WireTap]:
    relay = WireTap(app.port).start()
    try:
        yield relay
    finally:
        relay.close()


ROUTES: list[dict[str, object]] = [
    {"path": "/events"},
    {"path": "/open", "protect_variants": False},
]


@pytest.fixture(scope="module")
def ssefan(
    app: TestApp,
    tap: WireTap,
    stream_upstream: FakeUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SsefanProcess]:
    routes: list[dict[str, object]] = [
        *ROUTES,
        {"path": "/secure", "auth": {"url": f"{app.url}/auth"}},
    ]
    config: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "app": tap.url,
        "admin": {"listen": "127.0.0.1:0"},
        "routes": [{"upstream": stream_upstream.url, "heartbeat": "15s", **r} for r in routes],
    }
    path = write_config(tmp_path_factory.mktemp("checks") / "ssefan.yaml", config)
    # Debug level: the log-line checks below see every line ssefan writes.
    proc = SsefanProcess(path, args=("--log-level", "debug")).start()
    try:
        stream_upstream.wait_connected(len(routes))
        yield proc
    finally:
        stop_clean(proc)


@pytest.fixture
def witness(ssefan: SsefanProcess) -> Iterator[SSEClient]:
    """A stream opened before the test does anything; it must keep flowing."""
    client = SSEClient(ssefan.host, ssefan.port, "/events")
    try:
        assert client.status == 200
        yield client
    finally:
        client.close()


def assert_still_streaming(upstream: FakeUpstream, client: SSEClient) -> None:
    data = f"still-streaming-{next(_unique)}"
    upstream.publish(data)
    pump_until(client, lambda: any(e.data == data for e in client.events), 5.0, repr(data))


def refused(ssefan: SsefanProcess, status: int) -> float:
    samples = scrape(admin_url(ssefan))
    return samples.get(("ssefan_refused_total", frozenset({("status", str(status))})), 0.0)


def app_saw(app: TestApp, tap: WireTap, probe: str) -> bool:
    in_app = any(probe in f"{r.target} {r.headers}" for r in app.requests)
    return in_app or probe.encode() in tap.wire


def exchange(ssefan: SsefanProcess, raw: bytes) -> tuple[Response, bytes]:
    """Send `raw` on a new connection: the response, and what came after it
    until the server closed (failing if it does not close)."""
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            conn.send(raw)  # refused and closed before all was sent: the answer is readable
        response = conn.read_response()
        return response, conn.buf + conn.wait_closed(5.0)
    finally:
        conn.close()


def head(line: str, *headers: str, probe: str) -> bytes:
    """A request head: `line`, `headers`, and an X-Probe header the app must never see."""
    return ("\r\n".join([line, *headers, f"X-Probe: {probe}"]) + "\r\n\r\n").encode("latin-1")


H = "Host: ssefan.test"
# (request line, header lines, status): each must be answered by ssefan itself.
MALFORMED = [
    pytest.param("GET /events HTTP/2.0", [H], 505, id="http2-stream"),
    pytest.param("GET /events HTTP/9.9", [H], 505, id="http9-stream"),
    pytest.param("GET /events HTTP/1.2", [H], 505, id="http12-stream"),
    pytest.param("GET /echo/v HTTP/2.0", [H], 505, id="http2-pass-through"),
    pytest.param("GET /echo/v HTTP/0.9", [H], 505, id="http09-pass-through"),
    pytest.param("GET events HTTP/1.1", [H], 400, id="target-no-slash"),
    pytest.param("GET echo HTTP/1.1", [H], 400, id="target-no-slash-pass-through"),
    pytest.param("GET ftp://x/events HTTP/1.1", [H], 400, id="ftp-scheme"),
    pytest.param("GET ftp://x/echo HTTP/1.1", [H], 400, id="ftp-scheme-pass-through"),
    pytest.param("GET x:/events HTTP/1.1", [H], 400, id="scheme-without-authority"),
    pytest.param("GET http:///events HTTP/1.1", [H], 400, id="empty-authority"),
    pytest.param("GET http://u:p@ssefan.test/echo HTTP/1.1", [H], 400, id="userinfo"),
    pytest.param("GET http://x:99999/echo HTTP/1.1", [H], 400, id="authority-bad-port"),
    pytest.param("GET /events#top HTTP/1.1", [H], 400, id="fragment-stream"),
    pytest.param("GET /echo#/../events HTTP/1.1", [H], 400, id="fragment-dot-dot"),
    pytest.param("GET * HTTP/1.1", [H], 400, id="asterisk-get"),
    pytest.param("POST * HTTP/1.1", [H, "Content-Length: 0"], 400, id="asterisk-post"),
    pytest.param("CONNECT ssefan.test:443 HTTP/1.1", ["Host: ssefan.test:443"], 501, id="connect"),
    pytest.param("GET /events HTTP/1.1", [], 400, id="http11-no-host-stream"),
    pytest.param("GET /echo HTTP/1.1", [], 400, id="http11-no-host-pass-through"),
    pytest.param("GET /echo HTTP/1.1", [H, "host: other.test"], 400, id="two-hosts"),
    pytest.param("GET /events HTTP/1.1", ["Host: a b"], 400, id="host-with-space"),
    pytest.param("GET /echo HTTP/1.1", ["Host: evil.example/x?y"], 400, id="host-with-path"),
    pytest.param("GET /echo HTTP/1.1", ["Host: a.example, b.example"], 400, id="host-list"),
    pytest.param("GET /echo HTTP/1.1", ["Host:"], 400, id="host-empty"),
    pytest.param("GET /echo HTTP/1.1", ["Host: ssefan.test:0x50"], 400, id="host-bad-port"),
    pytest.param("GET /echo HTTP/1.0", ["Host: a b"], 400, id="host-invalid-http10"),
    pytest.param(
        "GET http://ok.example/echo HTTP/1.1", ["Host: a b"], 400, id="absolute-bad-host-header"
    ),
]


@pytest.mark.parametrize(("line", "headers", "status"), MALFORMED)
def test_malformed_request_is_refused_closed_and_never_forwarded(
    ssefan: SsefanProcess,
    app: TestApp,
    tap: WireTap,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    line: str,
    headers: list[str],
    status: int,
) -> None:
    probe = f"probe-{next(_unique)}"
    before = refused(ssefan, status)
    response, after = exchange(ssefan, head(line, *headers, probe=probe))
    assert response.status == status, response
    assert response.headers.get("connection") == "close"
    assert after == b""
    assert refused(ssefan, status) == before + 1, "ssefan itself must have answered"
    assert not app_saw(app, tap, probe)
    assert_still_streaming(stream_upstream, witness)


@pytest.mark.parametrize(
    "after_preface",
    [
        pytest.param(b"", id="preface-alone"),
        # A SETTINGS frame (RFC 9113 §6.5), as an h2 client sends next.
        pytest.param(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", id="preface-and-settings"),
    ],
)
def test_http2_preface_is_refused_and_never_forwarded(
    ssefan: SsefanProcess,
    app: TestApp,
    tap: WireTap,
    stream_upstream: FakeUpstream,
    witness: SSEClient,
    after_preface: bytes,
) -> None:
    before = refused(ssefan, 505)
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # RFC 9113 §3.4
    response, after = exchange(ssefan, preface + after_preface)
    assert response.status == 505, response
    assert response.headers.get("connection") == "close"
    assert after == b""
    assert refused(ssefan, 505) == before + 1
    assert b"PRI " not in tap.wire and not [r for r in app.requests if r.method == "PRI"]
    assert_still_streaming(stream_upstream, witness)


def test_the_tap_sees_what_is_passed_through(
    ssefan: SsefanProcess, app: TestApp, tap: WireTap
) -> None:
    """The control for the "never forwarded" checks: a sound request is seen."""
    probe = f"probe-{next(_unique)}"
    raw = head("GET /echo/control HTTP/1.1", H, "Connection: close", probe=probe)
    response, _ = exchange(ssefan, raw)
    assert response.status == 200
    assert app_saw(app, tap, probe)


def test_absolute_form_is_routed_and_forwarded_by_its_path_and_authority(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    # A stream by the target's path ...
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(b"GET http://public.example/events HTTP/1.1\r\nHost: ssefan.test\r\n\r\n")
        stream = conn.read_head()
        assert stream.status == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    finally:
        conn.close()
    # ... and the pass-through sends the app that path, and the target's host.
    probe = f"probe-{next(_unique)}"
    raw = head(
        "GET http://public.example:8443/echo/abs?q=1 HTTP/1.1",
        "Host: other.example",
        "Connection: close",
        probe=probe,
    )
    response, _ = exchange(ssefan, raw)
    assert response.status == 200
    (seen,) = [r for r in app.requests if r.header("x-probe") == probe]
    assert seen.target == "/echo/abs?q=1"
    assert seen.header("host") == "public.example:8443"
    assert seen.header("x-forwarded-host") == "public.example:8443"


def test_refused_request_log_lines_quote_neither_target_nor_headers(
    ssefan: SsefanProcess,
) -> None:
    secrets = [f"secret{next(_unique)}x" for _ in range(4)]
    shapes = [
        (400, f"GET ftp://x/events?token={secrets[0]} HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            400,
            f"GET /events?token={secrets[1]} HTTP/1.1\r\nHost: {secrets[1]} x\r\n"
            f"Cookie: session={secrets[2]}\r\n\r\n",
        ),
        (505, f"GET /echo?token={secrets[2]} HTTP/2.0\r\nHost: x\r\n\r\n"),
        (404, f"GET /EVENTS?token={secrets[3]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ]
    lines = []
    for status, shape in shapes:
        conn = RawConnection(ssefan.host, ssefan.port)
        try:
            # ssefan names a client by its address: this connection's line is found by it.
            lines.append(f"peer=127.0.0.1:{conn.sock.getsockname()[1]} ")
            conn.send(shape.encode())
            response = conn.read_response()
            assert response.status == status
            for secret in secrets:
                assert secret.encode() not in response.body
            conn.wait_closed()
        finally:
            conn.close()

    def refusal_lines() -> list[str]:
        return [ln for ln in ssefan.lines if any(peer in ln for peer in lines)]

    wait_until(lambda: len(refusal_lines()) >= len(shapes), what="the refusal lines")
    found = refusal_lines()
    assert any("HTTP/2.0 is not supported" in ln for ln in found), found
    assert any("a variant of route /events" in ln for ln in found), found
    for secret in secrets:
        assert secret not in ssefan.log_text()


# --------------------------------------------------------------------------- protect_variants

VARIANTS = [
    "/EVENTS",
    "/Events",
    "/events%00",
    "/events%0a",
    "/events%0D%0A",
    "/ev%e2%80%8bents",
    "/%EF%BB%BFevents",
    "/EVENTS/",
    "/%45VENTS",
    "/SECURE",
    "/%C5%BFecure",
    "/secure%00",
]


@pytest.mark.parametrize("path", VARIANTS)
def test_variant_of_a_protected_route_is_404_and_never_passed_through(
    ssefan: SsefanProcess, app: TestApp, tap: WireTap, path: str
) -> None:
    probe = f"probe-{next(_unique)}"
    auth_calls = len(app.seen("/auth"))
    before = refused(ssefan, 404)
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(head(f"GET {path}?p={probe} HTTP/1.1", H, probe=probe))
        response = conn.read_response()
        assert response.status == 404, response
        assert b"only in case or in invisible characters" in response.body
        # Keep-alive: a refusal of a well-formed request does not close.
        assert "connection" not in response.headers
        conn.send(head("GET /echo/after-variant HTTP/1.1", H, probe="after"))
        assert conn.read_response().status == 200
    finally:
        conn.close()
    assert refused(ssefan, 404) == before + 1
    assert not app_saw(app, tap, probe)
    assert len(app.seen("/auth")) == auth_calls, "no forward-auth call for a variant"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/OPEN", id="variant-of-a-route-with-protect_variants-false"),
        pytest.param("/open%00", id="nul-variant-with-protect_variants-false"),
        pytest.param("/eventsx", id="no-variant"),
        pytest.param("/event", id="no-variant-shorter"),
    ],
)
def test_other_paths_are_passed_through(
    ssefan: SsefanProcess, app: TestApp, tap: WireTap, path: str
) -> None:
    probe = f"probe-{next(_unique)}"
    response, _ = exchange(
        ssefan, head(f"GET {path} HTTP/1.1", H, "Connection: close", probe=probe)
    )
    assert response.status == 404  # the app's own: it has no such endpoint
    assert response.body == b"no such endpoint\n"
    assert app_saw(app, tap, probe)


def test_the_routes_themselves_are_still_served(ssefan: SsefanProcess) -> None:
    for path, status in (("/events", 200), ("/open", 200), ("/secure", 401)):
        conn = RawConnection(ssefan.host, ssefan.port)
        try:
            conn.send(f"GET {path} HTTP/1.1\r\nHost: ssefan.test\r\n\r\n".encode())
            assert conn.read_head().status == status, path
        finally:
            conn.close()


# --------------------------------------------------------------------------- drain


def test_pass_through_during_a_drain_closes_the_connection(app: TestApp) -> None:
    """In process, so the drain's moment is the test's: the request in flight
    when the drain starts gets its answer with `Connection: close`, and the
    connection closes after it; an idle keep-alive connection is closed."""

    async def scenario() -> None:
        config = parse_config(f"listen: 127.0.0.1:0\napp: {app.url}\nroutes: []\n", "<test>")
        ssefan = App(config)
        await ssefan.start(announce=False)
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                await drained(ssefan)
        finally:
            await ssefan.stop()

    async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        return head, await reader.readexactly(length)

    async def drained(ssefan: App) -> None:
        idle_reader, idle_writer = await asyncio.open_connection(*ssefan.address)
        busy_reader, busy_writer = await asyncio.open_connection(*ssefan.address)
        try:
            # Before the drain: keep-alive as usual.
            idle_writer.write(b"GET /echo/before-drain HTTP/1.1\r\nHost: ssefan.test\r\n\r\n")
            head, _ = await read_response(idle_reader)
            assert b"connection: close" not in head.lower()
            # A request in flight: the app holds /sink until its gate opens.
            probe = f"/sink?drain={next(_unique)}"
            busy_writer.write(
                f"POST {probe} HTTP/1.1\r\nHost: ssefan.test\r\nContent-Length: 5\r\n\r\n".encode()
                + b"hello"
            )
            await asyncio.to_thread(wait_until, lambda: bool(app.seen("/sink")))
            await ssefan.drain(1.0)
            assert ssefan.server is not None and ssefan.server.draining
            assert await idle_reader.read() == b"", "the idle connection is closed"
            app.gates["sink"].set()
            head, body = await read_response(busy_reader)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"\r\nconnection: close\r\n" in head.lower(), head
            assert body == b"5"
            assert await busy_reader.read() == b"", "closed after the response"
        finally:
            for writer in (idle_writer, busy_writer):
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

    asyncio.run(scenario())


def test_ssefan_answers_during_a_drain_close_too(app: TestApp) -> None:
    """A request on a connection still open when the drain started (it was
    arriving, so the drain did not close it): its answer closes it."""

    async def scenario() -> None:
        config = parse_config(
            f"listen: 127.0.0.1:0\napp: {app.url}\nroutes:\n  - path: /events\n"
            "    upstream: http://127.0.0.1:1/events\n    mode: lazy\n",
            "<test>",
        )
        ssefan = App(config)
        await ssefan.start(announce=False)
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                reader, writer = await asyncio.open_connection(*ssefan.address)
                try:
                    assert ssefan.server is not None
                    # As the drain sets it, without closing idle connections first.
                    ssefan.server.draining = True
                    for target in (b"/EVENTS", b"/echo/during-drain"):
                        writer.write(b"GET %s HTTP/1.1\r\nHost: ssefan.test\r\n\r\n" % target)
                    received = await reader.read(-1)  # until the server closes
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
        finally:
            await ssefan.stop()
        # One answer (the variant's 404), closing; the pipelined request behind
        # it is left for the client to send elsewhere.
        assert received.startswith(b"HTTP/1.1 404 "), received
        assert received.count(b"HTTP/1.1 ") == 1, received
        assert b"\r\nconnection: close\r\n" in received.lower()

    asyncio.run(scenario())


def test_options_asterisk_without_an_app_is_answered_by_ssefan() -> None:
    async def scenario() -> list[bytes]:
        config = parse_config(
            "listen: 127.0.0.1:0\nroutes:\n  - path: /events\n"
            "    upstream: http://127.0.0.1:1/events\n    mode: lazy\n",
            "<test>",
        )
        ssefan = App(config)
        await ssefan.start(announce=False)
        answers = []
        try:
            for line in (b"OPTIONS * HTTP/1.1", b"GET * HTTP/1.1"):
                reader, writer = await asyncio.open_connection(*ssefan.address)
                try:
                    writer.write(line + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
                    async with asyncio.timeout(DEFAULT_TIMEOUT):
                        answers.append(await reader.read(-1))
                finally:
                    writer.close()
                    with contextlib.suppress(ConnectionError):
                        await writer.wait_closed()
        finally:
            await ssefan.stop()
        return answers

    options, get = asyncio.run(scenario())
    assert options.startswith(b"HTTP/1.1 204 "), options
    assert b"\r\nallow: get, head, options\r\n" in options.lower(), options
    assert get.startswith(b"HTTP/1.1 400 "), get


def test_the_apps_own_stream_endpoint_is_not_passed_through(
    app: TestApp, stream_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Route /feed is fed from the app's /internal/stream on the `app` origin:
    a client asking for /internal/stream directly gets 404 (it would cost the
    app a stream per client, past forward-auth); the app's other paths pass."""
    config: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "app": app.url,
        "routes": [
            {"path": "/events", "upstream": stream_upstream.url},
            {"path": "/feed", "upstream": f"{app.url}/internal/stream", "mode": "lazy"},
        ],
    }
    proc = SsefanProcess(write_config(tmp_path / "ssefan.yaml", config)).start()
    try:
        hidden, passed = f"probe-{next(_unique)}", f"probe-{next(_unique)}"
        conn = RawConnection(proc.host, proc.port)
        try:
            conn.send(f"GET /Internal/stream?p={hidden} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            response = conn.read_response()
            assert response.status == 404, response
            assert b"subscribe to /feed" in response.body
            conn.send(f"GET /internal/other?p={passed} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert conn.read_response().body == b"no such endpoint\n"  # the app's own answer
        finally:
            conn.close()
        assert any(passed in r.target for r in app.requests)
        assert not any(hidden in r.target for r in app.requests)
    finally:
        proc.stop()
