"""Forward-auth for stream routes against a real auth endpoint on loopback.

The test app's /auth admits or refuses by the `session` cookie or a bearer
token (`TestApp.auth_rules`). One ssefan (module scope, --log-level debug)
has a route per concern. Every credential is a fresh random value, so a test
finds its own auth calls, and the last test checks that none of them ever
reached a log line.
"""

from __future__ import annotations

import itertools
import secrets
import time
from collections.abc import Iterator

import pytest
from app_server import SeenRequest, TestApp, VerboseSsefan, free_port, stop_clean
from harness import (
    DEFAULT_TIMEOUT,
    FakeUpstream,
    RawConnection,
    SSEClient,
    SsefanProcess,
    holds_for,
    http_request,
    wait_until,
    write_config,
)

from ssefan.auth import ForwardAuth
from ssefan.config import AuthConfig
from ssefan.forwarding import TrustedProxies
from ssefan.pool import ConnectionPool, Origin

REVALIDATE = 0.3
AUTH_TIMEOUT = 0.5
_unique = itertools.count()


def secret(kind: str) -> str:
    """A credential value no log line may ever contain."""
    return f"{kind}-{secrets.token_hex(8)}"


@pytest.fixture(scope="module")
def app() -> Iterator[TestApp]:
    server = TestApp().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def stream_upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def ssefan(
    app: TestApp, stream_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    auth = {"url": f"{app.url}/auth", "forward": ["cookie", "authorization"]}
    routes = [
        {"path": "/events", "auth": {**auth, "cache": "30s", "token_param": "token"}},
        {"path": "/revalidated", "auth": {**auth, "cache": "50ms", "revalidate": "300ms"}},
        {"path": "/auth-down", "auth": {"url": f"http://127.0.0.1:{free_port()}/auth"}},
        {"path": "/auth-hangs", "auth": {"url": f"{app.url}/slow", "timeout": "500ms"}},
    ]
    config = {
        "listen": "127.0.0.1:0",
        "app": app.url,  # pass-through too: its log lines must be clean as well
        "proxy": {"first_byte_timeout": "500ms"},
        "routes": [{"upstream": stream_upstream.url, **route} for route in routes],
    }
    path = write_config(tmp_path_factory.mktemp("auth") / "ssefan.yaml", config)
    proc = VerboseSsefan(path).start()
    try:
        stream_upstream.wait_connected(len(routes))
        yield proc
    finally:
        stop_clean(proc)


def auth_calls(app: TestApp, credential: str) -> list[SeenRequest]:
    return [
        r
        for r in app.seen("/auth")
        if credential in (r.header("cookie") or "")
        or credential in (r.header("authorization") or "")
    ]


def publish_and_expect(upstream: FakeUpstream, *clients: SSEClient) -> None:
    data = f"event-{next(_unique)}"
    upstream.publish(data)
    for client in clients:
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while not any(e.data == data for e in client.events):
            assert time.monotonic() < deadline, f"no {data!r}; got {client.events}"
            assert client.pump(), f"stream ended before {data!r}"


def get(
    proc: SsefanProcess, target: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    lines = [f"GET {target} HTTP/1.1", "Host: ssefan.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    response = http_request(proc.host, proc.port, ("\r\n".join(lines) + "\r\n\r\n").encode())
    return response.status, response.headers, response.body


# --------------------------------------------------------------------------- decisions


def test_admitted_client_streams_and_the_auth_endpoint_sees_the_context(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    user = secret("alice")
    app.auth_rules[user] = 200
    client = SSEClient(
        ssefan.host,
        ssefan.port,
        "/events?room=7",
        headers={"Cookie": f"session={user}", "X-Not-Forwarded": "private"},
    )
    try:
        assert client.status == 200
        assert client.headers["content-type"] == "text/event-stream; charset=utf-8"
        publish_and_expect(stream_upstream, client)
    finally:
        client.close()
    [call] = auth_calls(app, user)
    assert call.method == "GET"
    assert call.header("cookie") == f"session={user}"
    assert call.header("x-forwarded-uri") == "/events?room=7"
    assert call.header("x-forwarded-method") == "GET"
    assert call.header("x-forwarded-for") == "127.0.0.1"
    assert call.header("x-forwarded-host") == f"{ssefan.host}:{ssefan.port}"
    assert call.header("x-request-id")
    assert not call.has("x-not-forwarded"), "only the configured headers are forwarded"


@pytest.mark.parametrize(
    ("status", "body", "challenge"),
    [
        pytest.param(401, b"who are you?\n", 'Bearer realm="ssefan-test"', id="401"),
        pytest.param(403, b"not you\n", None, id="403"),
    ],
)
def test_refusals_are_passed_on_as_they_came(
    ssefan: SsefanProcess, app: TestApp, status: int, body: bytes, challenge: str | None
) -> None:
    user = secret("mallory")
    app.auth_rules[user] = status
    got_status, headers, got_body = get(ssefan, "/events", {"Cookie": f"session={user}"})
    assert (got_status, got_body) == (status, body)
    assert headers.get("www-authenticate") == challenge
    assert headers["content-type"] == "text/plain"
    assert len(auth_calls(app, user)) == 1


def test_query_token_is_sent_as_a_header(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    token = secret("token")
    app.auth_rules[token] = 200
    client = SSEClient(ssefan.host, ssefan.port, f"/events?token={token}&room=1")
    try:
        assert client.status == 200
        publish_and_expect(stream_upstream, client)
    finally:
        client.close()
    [call] = auth_calls(app, token)
    assert call.header("authorization") == f"Bearer {token}"
    # The token moved into the header; the URI the auth endpoint logs lacks it.
    assert call.header("x-forwarded-uri") == "/events?room=1"


@pytest.mark.parametrize(
    ("path", "max_seconds"),
    [
        pytest.param("/auth-down", DEFAULT_TIMEOUT, id="auth-endpoint-down"),
        pytest.param("/auth-hangs", AUTH_TIMEOUT + 2, id="no-answer-in-time"),
    ],
)
def test_auth_unavailable_is_503(ssefan: SsefanProcess, path: str, max_seconds: float) -> None:
    started = time.monotonic()
    status, headers, body = get(ssefan, path, {"Cookie": f"session={secret('bob')}"})
    assert status == 503
    assert headers["retry-after"] == "5"
    assert body == b"503 authorization is unavailable, retry shortly\n"
    assert time.monotonic() - started < max_seconds


def test_decisions_are_cached_per_credential(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    user, other = secret("carol"), secret("dave")
    app.auth_rules.update({user: 200, other: 200})
    cookie = {"Cookie": f"session={user}"}
    clients = [
        SSEClient(ssefan.host, ssefan.port, "/events", headers=cookie),
        SSEClient(ssefan.host, ssefan.port, "/events", headers=cookie),
        # A resume cursor says where, not who: still the same credential.
        SSEClient(ssefan.host, ssefan.port, "/events?last_event_id=x", headers=cookie),
        SSEClient(ssefan.host, ssefan.port, "/events", headers={"Cookie": f"session={other}"}),
    ]
    try:
        assert [c.status for c in clients] == [200] * 4
        publish_and_expect(stream_upstream, *clients)
    finally:
        for client in clients:
            client.close()
    assert len(auth_calls(app, user)) == 1
    assert len(auth_calls(app, other)) == 1


def test_concurrent_asks_for_one_credential_share_one_auth_request(
    ssefan: SsefanProcess, app: TestApp
) -> None:
    user = secret("grace")
    app.auth_rules[user] = 200
    app.auth_held.add(user)
    app.gates["auth"].clear()
    conns = [RawConnection(ssefan.host, ssefan.port) for _ in range(3)]
    try:
        for conn in conns:
            conn.send(f"GET /events HTTP/1.1\r\nHost: x\r\nCookie: session={user}\r\n\r\n".encode())
        wait_until(lambda: len(auth_calls(app, user)) == 1, what="the first auth call")
        # While that answer is pending, the other two must not ask again.
        holds_for(lambda: len(auth_calls(app, user)) == 1, 0.3, "a single auth call")
        app.gates["auth"].set()
        assert [conn.read_head().status for conn in conns] == [200] * 3
    finally:
        app.gates["auth"].set()
        for conn in conns:
            conn.close()


def test_revalidation_ends_only_the_revoked_streams(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    revoked, kept = secret("erin"), secret("frank")
    app.auth_rules.update({revoked: 200, kept: 200})
    doomed = [
        SSEClient(
            ssefan.host, ssefan.port, "/revalidated", headers={"Cookie": f"session={revoked}"}
        )
        for _ in range(2)
    ]
    survivor = SSEClient(
        ssefan.host, ssefan.port, "/revalidated", headers={"Cookie": f"session={kept}"}
    )
    clients = [*doomed, survivor]
    try:
        assert [c.status for c in clients] == [200] * 3
        publish_and_expect(stream_upstream, *clients)
        connected = time.monotonic()
        # Two revalidation passes while admitted: the streams stay.
        wait_until(
            lambda: len([c for c in auth_calls(app, revoked) if c.at > connected]) >= 2,
            what="two revalidation passes",
        )
        publish_and_expect(stream_upstream, *clients)
        app.auth_rules[revoked] = 403
        for client in doomed:
            client.read_until_closed(timeout=REVALIDATE * 10)
            assert client.closed
        publish_and_expect(stream_upstream, survivor)
    finally:
        for client in clients:
            client.close()
    # One re-ask per pass for the credential, not one per stream: the asks
    # are a revalidation interval apart, never two in one pass.
    asks = [c.at for c in auth_calls(app, revoked) if c.at > connected]
    gaps = [b - a for a, b in itertools.pairwise(asks)]
    assert len(asks) >= 3 and min(gaps) > REVALIDATE / 2, gaps


# --------------------------------------------------------------------------- logs


def test_no_credential_reaches_a_log_line(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream
) -> None:
    values = {kind: secret(kind) for kind in ("cookie", "bearer", "query", "denied", "junk")}
    app.auth_rules.update({values["cookie"]: 200, values["bearer"]: 200, values["query"]: 200})
    app.auth_rules[values["denied"]] = 403
    # Admitted (cookie, Authorization, query token), denied, unavailable, revoked.
    streams = [
        SSEClient(
            ssefan.host, ssefan.port, "/events", headers={"Cookie": f"session={values['cookie']}"}
        ),
        SSEClient(
            ssefan.host,
            ssefan.port,
            "/revalidated",
            headers={"Authorization": f"Bearer {values['bearer']}"},
        ),
        SSEClient(ssefan.host, ssefan.port, f"/events?token={values['query']}"),
    ]
    try:
        assert [c.status for c in streams] == [200] * 3
        assert get(ssefan, "/events", {"Cookie": f"session={values['denied']}"})[0] == 403
        assert get(ssefan, "/auth-down", {"Cookie": f"session={values['cookie']}"})[0] == 503
        app.auth_rules[values["bearer"]] = 401
        streams[1].read_until_closed(timeout=REVALIDATE * 10)
    finally:
        for client in streams:
            client.close()
    # A pass-through request that fails (and is logged) with a token in its target...
    status, _, _ = get(ssefan, f"/slow?token={values['query']}&access_token={values['query']}", {})
    assert status == 504
    # ...and a malformed request whose bad header line holds a cookie.
    conn = RawConnection(ssefan.host, ssefan.port)
    try:
        conn.send(
            b"GET /events HTTP/1.1\r\nHost: x\r\n"
            + f"Cookie: session={values['junk']}\x00\r\n\r\n".encode()
        )
        bad = conn.read_response()
    finally:
        conn.close()
    assert bad.status == 400
    assert values["junk"].encode() not in bad.body
    wait_until(lambda: "GET /slow?token=***" in ssefan.log_text(), what="the 504 log line")
    wait_until(lambda: "no longer admitted" in ssefan.log_text(), what="the revocation log line")
    wait_until(lambda: "bad request (400)" in ssefan.log_text(), what="the 400 log line")
    text = ssefan.log_text()
    leaked = [kind for kind, value in values.items() if value in text]
    assert leaked == [], f"credentials in the log: {leaked}"


# --------------------------------------------------------------------------- credential keys

H = list[tuple[bytes, bytes]]
COOKIE_A: H = [(b"Cookie", b"session=a")]
COOKIE_B: H = [(b"Cookie", b"session=b")]


# One instance for every case: each ForwardAuth keys its hashes with its own secret.
KEYS = ForwardAuth(
    "/events",
    AuthConfig(url="http://127.0.0.1:9/auth", token_param="token"),
    ConnectionPool(
        Origin.from_url("http://127.0.0.1:9"), size=1, idle_timeout=1, connect_timeout=1
    ),
    trusted=TrustedProxies([]),
)


def key(headers: H, query: str = "", path: str = "/events") -> bytes:
    credential = KEYS.credential(
        [(b"Host", b"x"), *headers],
        path,
        query,
        peer_ip="127.0.0.1",
        scheme="http",
        volatile_params=("last_event_id",),
    )
    assert b"session=" not in repr(credential).encode(), "a credential's repr hides its values"
    return credential.key


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        pytest.param(
            (COOKIE_A, ""), (COOKIE_A, "last_event_id=9"), True, id="resume-cursor-ignored"
        ),
        pytest.param(
            ([*COOKIE_A, (b"X-Other", b"1")], ""), (COOKIE_A, ""), True, id="unforwarded-ignored"
        ),
        pytest.param((COOKIE_A, ""), (COOKIE_B, ""), False, id="other-cookie"),
        pytest.param((COOKIE_A, ""), ([], ""), False, id="no-cookie"),
        pytest.param((COOKIE_A, "room=1"), (COOKIE_A, "room=2"), False, id="other-query"),
        pytest.param(
            ([], "token=t"), ([(b"Authorization", b"Bearer t")], ""), True, id="token-is-the-header"
        ),
        pytest.param(
            ([(b"Authorization", b"Bearer h")], "token=t"),
            ([(b"Authorization", b"Bearer h")], ""),
            True,
            id="real-header-wins",
        ),
    ],
)
def test_credential_keys(one: tuple[H, str], other: tuple[H, str], same: bool) -> None:
    assert (key(*one) == key(*other)) is same
