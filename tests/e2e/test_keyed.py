"""Template routes (issue 12) over loopback: `/jobs/{job}/progress`, one channel per key.

ssefan runs as a subprocess in front of `KeyedApp` (tests/support/keyed_app.py),
a real app serving `/jobs/<key>/progress` per key that records every request
and when it saw each stream open and close. What is checked is what the app
and the clients observe: one upstream connection per live key, every event
to its own key's clients once, the linger measured on the app's own clock,
hostile keys refused before they reach the app, no client credential on the
shared upstream request, the channel caps, per-key 404/410, per-key
forward-auth and the global ring budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from keyed_app import KeyedApp, keyed_config, progress, template_route
from raw_http import Response, get_stream, http_request
from sse_clients import AsyncSSEClient, ReceivedEvent, SSEClient, pump_until, refusal_of
from ssefan_process import SsefanProcess, stop_clean, write_config
from waits import holds_for, wait_until

GAP = "ssefan-gap"


@pytest.fixture
def keyed_app() -> Iterator[KeyedApp]:
    app = KeyedApp().start()
    try:
        yield app
    finally:
        app.close()


def raise_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE (ssefan, started later, inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files, the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextlib.contextmanager
def serving(tmp_path: Path, config: dict[str, object]) -> Iterator[SsefanProcess]:
    """ssefan on `config`, stopped on exit; also when it fails to start (its
    log pipe is closed then too, rather than left to a ResourceWarning)."""
    proc = SsefanProcess(write_config(tmp_path / "ssefan.yaml", config))
    try:
        yield proc.start()
    finally:
        proc.stop()


def get(proc: SsefanProcess, target: str, headers: dict[str, str] | None = None) -> Response:
    """One request for `target` exactly as written (a raw socket), one finite answer."""
    lines = [f"GET {target} HTTP/1.1", f"Host: {proc.host}:{proc.port}", "Connection: close"]
    lines += ["Accept: text/event-stream", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return http_request(proc.host, proc.port, ("\r\n".join(lines) + "\r\n\r\n").encode())


def stream(proc: SsefanProcess, key: str, prefix: str = "/jobs", **headers: str) -> SSEClient:
    """An open stream for `key`, checked to be a stream and not a refusal."""
    client = SSEClient(proc.host, proc.port, progress(key, prefix), headers=headers)
    assert client.status == 200, (client.status, client.headers)
    assert "content-length" not in client.headers, f"a refusal, not a stream: {client.headers}"
    return client


def pairs(events: list[ReceivedEvent]) -> list[tuple[str, str | None, str]]:
    return [(e.event, e.id, e.data) for e in events]


# --------------------------------------------------------------------------- the app itself


def test_keyed_app_replays_records_and_observes_closes(keyed_app: KeyedApp) -> None:
    """The harness on its own, without ssefan: what the other tests rely on."""
    keyed_app.publish("k1", "one")
    keyed_app.publish("k1", "two\nlines")
    client = SSEClient("127.0.0.1", keyed_app.port, progress("k1"), headers={"Last-Event-ID": "1"})
    assert pairs(client.read_events(1)) == [("", "2", "two\nlines")]
    keyed_app.wait_connections("k1")
    assert keyed_app.publish("k1", "three") == 3
    assert [e.id for e in client.read_events(2)] == ["2", "3"]
    left_at = time.monotonic()
    client.close()
    closed = keyed_app.wait_closed("k1")
    assert closed.closed_at is not None and closed.closed_at >= left_at
    assert closed.last_event_id == "1"
    keyed_app.unknown["gone"] = 410
    assert get_stream("127.0.0.1", keyed_app.port, progress("gone")).status == 410
    assert get_stream("127.0.0.1", keyed_app.port, "/jobs/%2e%2e/progress").status == 404
    assert keyed_app.outside_template() == ["/jobs/%2e%2e/progress"]
    assert [len(keyed_app.connections(k)) for k in ("k1", "gone")] == [1, 0]


# --------------------------------------------------------------------------- fan-out per key

KEYS = 50
CLIENTS_PER_KEY = 20
EVENTS_PER_KEY = 5


def test_fifty_keys_twenty_clients_each_get_exactly_their_keys_events(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    raise_fd_limit(2 * (KEYS * CLIENTS_PER_KEY + 200))
    keys = [f"job-{k}" for k in range(KEYS)]
    order = [key for _ in range(CLIENTS_PER_KEY) for key in keys]  # keys interleaved

    def publish_all() -> None:
        for i in range(1, EVENTS_PER_KEY + 1):  # round-robin over keys: interleaved upstreams
            for key in keys:
                keyed_app.publish(key, f"{key} step {i}")

    async def scenario(host: str, port: int) -> list[AsyncSSEClient]:
        gate = asyncio.Semaphore(100)

        async def one(key: str) -> AsyncSSEClient:
            async with gate:
                return await AsyncSSEClient.connect(host, port, progress(key), within=15)

        clients = list(await asyncio.gather(*(one(key) for key in order)))
        try:
            assert {c.status for c in clients} == {200}
            await asyncio.to_thread(
                wait_until,
                lambda: keyed_app.open_keys() >= set(keys),
                15,
                "an upstream stream for every key",
            )
            await asyncio.to_thread(publish_all)
            await asyncio.gather(*(c.read_events(EVENTS_PER_KEY, within=15) for c in clients))
        finally:
            await asyncio.gather(*(c.close() for c in clients))
        return clients

    with serving(tmp_path, keyed_config(template_route(keyed_app))) as proc:
        clients = asyncio.run(scenario(proc.host, proc.port))
        for key, client in zip(order, clients, strict=True):
            expected = [("", str(i), f"{key} step {i}") for i in range(1, EVENTS_PER_KEY + 1)]
            assert pairs(client.events) == expected, key  # its key's, in order, once
        for key in keys:  # exactly one upstream connection per key
            assert len(keyed_app.connections(key)) == 1, key
        assert len(keyed_app.stream_requests()) == KEYS
        assert keyed_app.outside_template() == []
        stop_clean(proc)


# --------------------------------------------------------------------------- linger

LINGER = 1.0
# asyncio may run a timer up to its clock resolution early; ssefan's own
# timer starts when it notices the close, after the test closed the socket.
EARLY = 0.1
LATE = 2.0


def test_a_keys_upstream_closes_linger_after_its_last_client_leaves(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    config = keyed_config(template_route(keyed_app, linger=f"{LINGER}s"))
    with serving(tmp_path, config) as proc:
        stays = stream(proc, "stays")
        first, last = stream(proc, "leaves"), stream(proc, "leaves")
        keyed_app.wait_connections("stays")
        keyed_app.wait_connections("leaves")
        for key in ("stays", "leaves"):
            keyed_app.publish(key, f"hello {key}")
        for client in (stays, first, last):
            client.read_events(1)

        first.close()  # one client of the key remains: the linger has not begun
        holds_for(
            lambda: keyed_app.open_count("leaves") == 1,
            0.6 * LINGER,
            "the key's upstream kept while a client remains",
        )
        left_at = time.monotonic()
        last.close()
        closed = keyed_app.wait_closed("leaves", timeout=LINGER + LATE + 1)
        assert closed.closed_at is not None
        lingered = closed.closed_at - left_at
        assert LINGER - EARLY <= lingered < LINGER + LATE, f"closed after {lingered:.2f}s"

        # The other key was never touched.
        assert [c.closed_at for c in keyed_app.connections("stays")] == [None]
        keyed_app.publish("stays", "still here")
        assert [e.data for e in stays.read_events(2)] == ["hello stays", "still here"]
        # The next client of the freed key subscribes it again.
        again = stream(proc, "leaves")
        keyed_app.wait_connections("leaves")
        assert len(keyed_app.connections("leaves")) == 2
        for client in (stays, again):
            client.close()


def test_a_client_back_within_linger_resumes_from_the_ring_without_a_gap(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    with serving(tmp_path, keyed_config(template_route(keyed_app, linger="5s"))) as proc:
        client = stream(proc, "resume")
        keyed_app.wait_connections("resume")
        for i in (1, 2):
            keyed_app.publish("resume", f"step {i}")
        assert [e.id for e in client.read_events(2)] == ["1", "2"]
        client.close()
        for i in (3, 4, 5):  # while nobody listens: the lingering channel keeps them
            keyed_app.publish("resume", f"step {i}")

        back = stream(proc, "resume", **{"Last-Event-ID": "2"})
        keyed_app.publish("resume", "step 6")
        events = back.read_events(4)
        assert pairs(events) == [("", str(i), f"step {i}") for i in (3, 4, 5, 6)]  # no gap
        [conn] = keyed_app.connections("resume")  # the same upstream connection all along
        assert conn.closed_at is None
        back.close()


# --------------------------------------------------------------------------- hostile keys

# Request targets, sent byte for byte, that no key of `/jobs/{job}/progress`
# (default pattern [A-Za-z0-9_-]{1,64}) may come from: each is 404 from ssefan
# and never reaches the app. Not here, because the router reads them as a
# valid key like a static route's path (see core.paths.routing_path):
# `/jobs/42;x/progress` and `/jobs/a%3Bb/progress` (`;params` cut),
# `/jobs/1/../2/progress` and `/jobs/1%2F..%2F2/progress` (key "2").
HOSTILE = [
    pytest.param("/jobs/../progress", id="dotdot"),
    pytest.param("/jobs/%2e%2e/progress", id="dotdot-encoded"),
    pytest.param("/jobs/%2E%2E/progress", id="dotdot-encoded-upper"),
    pytest.param("/jobs/%C0%AE%C0%AE/progress", id="dotdot-overlong-utf8"),
    pytest.param("/jobs/./progress", id="dot"),
    pytest.param("/jobs/%2e/progress", id="dot-encoded"),
    pytest.param("/jobs/..%2f..%2fadmin/progress", id="traversal-to-admin"),
    pytest.param("/jobs/a%2Fb/progress", id="encoded-slash"),
    pytest.param("/jobs/a%2fb/progress", id="encoded-slash-lower"),
    pytest.param("/jobs/a%5Cb/progress", id="encoded-backslash"),
    pytest.param("/jobs/%252F/progress", id="double-encoded-slash"),
    pytest.param("/jobs//progress", id="empty"),
    pytest.param("/jobs/;/progress", id="only-params"),
    pytest.param("/jobs/%00/progress", id="nul"),
    pytest.param("/jobs/a%00b/progress", id="nul-inside"),
    pytest.param("/jobs/a%0d%0ab/progress", id="crlf"),
    pytest.param("/jobs/a%09b/progress", id="tab"),
    pytest.param("/jobs/a%20b/progress", id="space"),
    pytest.param("/jobs/a+b/progress", id="plus"),
    pytest.param("/jobs/" + "a" * 65 + "/progress", id="65-chars"),
    pytest.param("/jobs/%C0%AF/progress", id="overlong-slash-utf8"),
    pytest.param("/jobs/%ff/progress", id="invalid-utf8"),
    pytest.param("/jobs/%EF%BD%81/progress", id="fullwidth-a"),
    pytest.param("/jobs/%C3%A9/progress", id="non-ascii-letter"),
    pytest.param("/jobs/%D9%A3/progress", id="arabic-indic-digit"),
    pytest.param("/jobs/%E2%80%8Bjob/progress", id="zero-width-space"),
    pytest.param("/jobs/a%E2%80%AEb/progress", id="bidi-override"),
    pytest.param("/jobs/%EF%BB%BF1/progress", id="bom"),
    pytest.param("/jobs/a.b/progress", id="dot-inside"),
    pytest.param("/jobs/~x/progress", id="tilde"),
    pytest.param("/jobs/a%3Fb/progress", id="encoded-question-mark"),
    pytest.param("/jobs/a%23b/progress", id="encoded-hash"),
    pytest.param("/jobs/a%3Cb%3E/progress", id="angle-brackets"),
    pytest.param("/jobs/%/progress", id="bare-percent"),
    pytest.param("/JOBS/1/progress", id="other-case"),
    pytest.param("/jobs/1/progress/..", id="dotdot-after"),
    pytest.param("/jobs/1/progress%2F..", id="encoded-dotdot-after"),
    pytest.param("/jobs/1/progress/extra", id="extra-segment"),
]

# Keys a route with a permissive pattern ((?s).{1,64}: anything) still never
# takes: controls, invisible characters, U+FFFD, and what the router resolves.
ALWAYS_REFUSED = [
    pytest.param("%00", id="nul"),
    pytest.param("a%0d%0ab", id="crlf"),
    pytest.param("a%09b", id="tab"),
    pytest.param("%7F", id="del"),
    pytest.param("%C2%85", id="c1-next-line"),
    pytest.param("%C2%AD", id="soft-hyphen"),
    pytest.param("%E2%80%8B", id="zero-width-space"),
    pytest.param("%E2%80%AE", id="bidi-override"),
    pytest.param("%EF%BB%BF", id="bom"),
    pytest.param("%EF%BF%BD", id="replacement-char"),
    pytest.param("%ff", id="invalid-utf8"),
    pytest.param("%2e%2e", id="dotdot"),
    pytest.param("a%5Cb", id="backslash"),
]
LOOSE = "/loose"
# One key that reaches the app by many spellings, all of them one channel.
SPELLINGS = [
    "/jobs/42/progress",
    "/jobs/%34%32/progress",
    "/jobs/42;x/progress",
    "/jobs/x/../42/progress",
    "/jobs/./42/progress",
    "/jobs/42/progress/",
    "//jobs//42//progress",
    "/jobs/1%2F..%2F42/progress",
]


@pytest.fixture(scope="module")
def hostile_app() -> Iterator[KeyedApp]:
    app = KeyedApp().start()
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="module")
def hostile(
    hostile_app: KeyedApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SsefanProcess]:
    """One ssefan for the tables: the default pattern and a permissive one.

    Both routes are checked to stream before any table runs, so a 404 below
    is a refusal by a working template route, not a route that is missing.
    """
    routes = [
        template_route(hostile_app),
        template_route(hostile_app, f"{LOOSE}/{{job}}/progress", key={"pattern": "(?s).{1,64}"}),
    ]
    path = write_config(tmp_path_factory.mktemp("keyed") / "ssefan.yaml", keyed_config(*routes))
    proc = SsefanProcess(path)
    try:
        proc.start()
        for key, prefix in (("control", "/jobs"), ("loose-control", LOOSE)):
            client = stream(proc, key, prefix)
            hostile_app.wait_connections(key)
            hostile_app.publish(key, "control")
            assert [e.data for e in client.read_events(1)] == ["control"]
            client.close()
        yield proc
    finally:
        stop_clean(proc)


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_key_is_404_and_never_reaches_the_app(
    hostile: SsefanProcess, hostile_app: KeyedApp, target: str
) -> None:
    seen = len(hostile_app.requests)
    response = get(hostile, target)
    assert response.status == 404, (response.status, response.body)
    assert len(hostile_app.requests) == seen
    assert hostile_app.outside_template() == []


@pytest.mark.parametrize("key", ALWAYS_REFUSED)
def test_a_permissive_pattern_never_takes_controls_or_invisible_keys(
    hostile: SsefanProcess, hostile_app: KeyedApp, key: str
) -> None:
    seen = len(hostile_app.requests)
    response = get(hostile, progress(key, LOOSE))
    assert response.status == 404, (response.status, response.body)
    assert len(hostile_app.requests) == seen
    assert hostile_app.outside_template() == []


def test_spellings_of_one_key_share_its_channel_and_the_app_sees_one_target(
    hostile: SsefanProcess, hostile_app: KeyedApp
) -> None:
    clients = [SSEClient(hostile.host, hostile.port, target) for target in SPELLINGS]
    try:
        assert [c.status for c in clients] == [200] * len(SPELLINGS)
        hostile_app.wait_connections("42")
        hostile_app.publish("42", "the answer")
        for client in clients:
            assert [e.data for e in client.read_events(1)] == ["the answer"]
        [request] = hostile_app.requests_for("42")
        assert request.target == "/jobs/42/progress"
        assert len(hostile_app.connections("42")) == 1
    finally:
        for client in clients:
            client.close()


def test_the_app_only_ever_saw_the_templates_own_targets(
    hostile: SsefanProcess, hostile_app: KeyedApp
) -> None:
    """Last in the module: over every table above, nothing else reached the app."""
    targets = {r.target for r in hostile_app.requests}
    assert targets == {progress("control"), progress("loose-control"), progress("42")}


# --------------------------------------------------------------------------- credentials


def test_client_credentials_never_reach_the_app_only_the_routes_headers_do(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    upstream = {
        "url": keyed_app.upstream,
        "headers": {"Authorization": "Bearer service-token", "X-Job": "{job}"},
    }
    config = keyed_config(template_route(keyed_app, upstream=upstream))
    secret_values = [f"secret-{i}-{time.monotonic_ns()}" for i in range(8)]

    def credentials(i: int) -> dict[str, str]:
        return {
            "Cookie": f"session={secret_values[i]}",
            "Authorization": f"Bearer {secret_values[i + 1]}",
            "Proxy-Authorization": f"Basic {secret_values[i + 2]}",
            "X-Api-Key": secret_values[i + 3],
        }

    with serving(tmp_path, config) as proc:
        # The first client of the key opens the shared upstream request; the
        # second joins it; a third, on another key, opens its own.
        first = stream(proc, "7", **credentials(0))
        keyed_app.wait_connections("7")
        second = stream(proc, "7", **credentials(4))
        other = stream(proc, "8", **credentials(4))
        keyed_app.wait_connections("8")
        for key in ("7", "8"):
            keyed_app.publish(key, f"for {key}")
        for client in (first, second, other):
            client.read_events(1)
        for client in (first, second, other):
            client.close()

    requests = keyed_app.stream_requests()
    assert [r.target for r in requests] == [progress("7"), progress("8")]
    for request, key in zip(requests, ("7", "8"), strict=True):
        assert request.header("authorization") == "Bearer service-token"  # the route's own
        assert request.header("x-job") == key
        for name in ("cookie", "proxy-authorization", "x-api-key"):
            assert request.header(name) is None, (name, request.headers)
        assert not any(s in value for s in secret_values for _, value in request.headers)


# --------------------------------------------------------------------------- channel caps

SHORT_LINGER = "300ms"


def test_route_max_channels_refuses_a_new_key_and_never_evicts_a_live_one(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    routes = [
        template_route(keyed_app, max_channels=2, linger=SHORT_LINGER),
        template_route(
            keyed_app, "/plain/{job}/progress", max_channels=1, refuse="status", linger="30s"
        ),
    ]
    with serving(tmp_path, keyed_config(*routes)) as proc:
        a1, a2 = stream(proc, "a1"), stream(proc, "a2")
        b1 = stream(proc, "b1", "/plain")
        for key in ("a1", "a2", "b1"):
            keyed_app.wait_connections(key)

        refused = get(proc, progress("a3"))  # the temporary refusal an EventSource retries
        assert refusal_of(refused)["reason"] == "max_channels"
        plain = get(proc, progress("b2", "/plain"))  # the route chose plain statuses
        assert plain.status == 503, (plain.status, plain.body)
        assert int(plain.headers["retry-after"]) >= 1
        assert keyed_app.requests_for("a3") == keyed_app.requests_for("b2") == []

        # The live keys were not touched: same connections, events still flow.
        for key, client in (("a1", a1), ("a2", a2), ("b1", b1)):
            keyed_app.publish(key, f"still {key}")
            assert [e.data for e in client.read_events(1)] == [f"still {key}"]
            assert [c.closed_at for c in keyed_app.connections(key)] == [None]

        # A key that lingers out makes room for a new one.
        a1.close()
        keyed_app.wait_closed("a1")
        a3 = stream(proc, "a3")
        keyed_app.wait_connections("a3")
        keyed_app.publish("a3", "room at last")
        assert [e.data for e in a3.read_events(1)] == ["room at last"]
        for client in (a2, a3, b1):
            client.close()


def test_global_max_channels_counts_every_template_route(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    routes = [
        template_route(keyed_app, linger=SHORT_LINGER),
        template_route(keyed_app, "/other/{job}/progress", linger=SHORT_LINGER),
    ]
    with serving(tmp_path, keyed_config(*routes, max_channels=3)) as proc:
        j1, j2, o1 = stream(proc, "j1"), stream(proc, "j2"), stream(proc, "o1", "/other")
        for key in ("j1", "j2", "o1"):
            keyed_app.wait_connections(key)
        for target in (progress("o2", "/other"), progress("j3")):
            assert refusal_of(get(proc, target))["reason"] == "max_channels", target
        assert keyed_app.requests_for("o2") == keyed_app.requests_for("j3") == []
        for key, client in (("j1", j1), ("j2", j2), ("o1", o1)):
            keyed_app.publish(key, f"still {key}")
            assert [e.data for e in client.read_events(1)] == [f"still {key}"]

        o1.close()  # frees one of the three, for either route
        keyed_app.wait_closed("o1")
        j3 = stream(proc, "j3")
        keyed_app.wait_connections("j3")
        assert refusal_of(get(proc, progress("o2", "/other")))["reason"] == "max_channels"
        for client in (j1, j2, j3):
            client.close()


# --------------------------------------------------------------------------- unknown keys

# ssefan caches an upstream 404/410 for a key for 10 s; this much of it is checked.
GONE_HELD = 1.5


@pytest.mark.parametrize("status", [404, 410])
def test_a_key_the_app_does_not_know_ends_and_is_not_asked_again(
    keyed_app: KeyedApp, tmp_path: Path, status: int
) -> None:
    keyed_app.unknown["gone"] = status
    with serving(tmp_path, keyed_config(template_route(keyed_app))) as proc:
        first = SSEClient(proc.host, proc.port, progress("gone"))
        try:
            if first.status == 200:  # the stream began before the app answered: it ends
                first.read_until_closed()
                assert first.closed and first.events == []
            else:
                assert first.status == status
        finally:
            first.close()
        keyed_app.wait_requests("gone")

        # New clients get the app's status from ssefan; the app is not asked again,
        # however hard they hammer.
        holds_for(
            lambda: (
                get(proc, progress("gone")).status == status
                and len(keyed_app.requests_for("gone")) == 1
            ),
            GONE_HELD,
            f"{status} from ssefan without another request to the app",
        )
        fine = stream(proc, "fine")  # other keys are not affected
        keyed_app.wait_connections("fine")
        keyed_app.publish("fine", "all good")
        assert [e.data for e in fine.read_events(1)] == ["all good"]
        fine.close()


# --------------------------------------------------------------------------- forward-auth


def test_forward_auth_decides_per_key_on_the_concrete_path(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    keyed_app.auth_rules.update(
        {("alice", progress("1")): 200, ("bob", progress("2")): 200}
    )  # alice may watch job 1 only, bob job 2 only
    auth = {"url": f"{keyed_app.url}/auth", "cache": "30s"}
    alice, bob = {"Cookie": "session=alice"}, {"Cookie": "session=bob"}
    with serving(tmp_path, keyed_config(template_route(keyed_app, auth=auth))) as proc:
        alice_1 = stream(proc, "1", **alice)
        [call] = keyed_app.auth_requests()
        assert call.header("x-forwarded-uri") == progress("1")
        assert call.header("cookie") == "session=alice"

        # Alice admitted for /jobs/1 (and cached) is not admitted for /jobs/2...
        assert get(proc, progress("2"), alice).status == 403
        assert get(proc, "/jobs/1/progress/../../2/progress", alice).status == 403
        # ...and bob, refused for /jobs/1, is still admitted for /jobs/2.
        assert get(proc, progress("1"), bob).status == 403
        bob_2 = stream(proc, "2", **bob)
        assert get(proc, "/jobs/%31/progress", bob).status == 403
        assert get(proc, progress("2"), alice).status == 403  # still, with both cached
        uris = {r.header("x-forwarded-uri") for r in keyed_app.auth_requests()}
        assert {progress("1"), progress("2")} <= uris

        for key in ("1", "2"):
            keyed_app.wait_connections(key)
            keyed_app.publish(key, f"job {key}")
        assert [e.data for e in alice_1.read_events(1)] == ["job 1"]
        assert [e.data for e in bob_2.read_events(1)] == ["job 2"]
        for client in (alice_1, bob_2):
            client.close()
    requests = keyed_app.stream_requests()
    assert sorted(r.target for r in requests) == [progress("1"), progress("2")]
    assert all(r.header("cookie") is None for r in requests)


# --------------------------------------------------------------------------- ring budget

RING_BYTES_TOTAL = 64 * 1024
HEAVY_EVENTS = 40  # 40 x ~2 KiB: more than the budget on its own
HEAVY_DATA = 2000
HUGE_DATA = 70 * 1024  # one event over the whole budget


def heavy(i: int) -> str:
    return f"{i:02d}" + "h" * (HEAVY_DATA - 2)


def resume(proc: SsefanProcess, key: str, after: int, newest: int) -> list[ReceivedEvent]:
    """A client resuming `key` after id `after`, read until it has id `newest`."""
    client = stream(proc, key, **{"Last-Event-ID": str(after)})
    try:
        pump_until(client, lambda: str(newest) in [e.id for e in client.events], what=key)
        return client.events
    finally:
        client.close()


def test_ring_bytes_total_evicts_the_heaviest_keys_oldest_events_first(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    config = keyed_config(template_route(keyed_app), ring_bytes_total="64KiB")
    with serving(tmp_path, config) as proc:
        holders: list[SSEClient] = []

        def fill(key: str, datas: list[str]) -> None:
            """Publish to `key` while a client holds its channel; wait until it has all."""
            holders.append(stream(proc, key))
            keyed_app.wait_connections(key)
            for data in datas:
                keyed_app.publish(key, data)
            holders[-1].read_events(len(datas))

        # The light key's events are the oldest of all: a budget that evicted the
        # globally oldest first would take them, not the heavy key's.
        fill("light", [f"light {i}" for i in range(1, 6)])
        fill("heavy", [heavy(i) for i in range(1, HEAVY_EVENTS + 1)])

        light = resume(proc, "light", 1, 5)
        assert pairs(light) == [("", str(i), f"light {i}") for i in range(2, 6)]  # no gap
        events = resume(proc, "heavy", 1, HEAVY_EVENTS)
        assert events[0].event == GAP, "the heavy key's old events were evicted"
        kept = [int(str(e.id)) for e in events[1:]]
        assert kept == list(range(kept[0], HEAVY_EVENTS + 1)), "a contiguous newest part"
        assert kept[0] > 2 and len(kept) * HEAVY_DATA <= RING_BYTES_TOTAL
        assert [e.data for e in events[1:]] == [heavy(i) for i in kept]

        # One event bigger than the whole budget: every key keeps its newest.
        fill("huge", ["tiny", "x" * HUGE_DATA])
        for key, after, newest, data in (
            ("huge", 1, 2, "x" * HUGE_DATA),
            ("light", 4, 5, "light 5"),
            ("heavy", HEAVY_EVENTS - 1, HEAVY_EVENTS, heavy(HEAVY_EVENTS)),
        ):
            got = [e for e in resume(proc, key, after, newest) if e.event != GAP]
            assert (got[-1].id, got[-1].data) == (str(newest), data), key
        for holder in holders:
            holder.close()
