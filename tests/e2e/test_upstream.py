"""The one upstream subscription over loopback: resume, headers, watchdog, backoff,
204, bad bytes, lazy mode, and heartbeats towards idle clients."""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sse_clients import SSEClient, event_ids, pump_until
from sse_upstream import FakeUpstream, FixedPortUpstream
from ssefan_process import SsefanProcess, fast_upstream, multi_route_config, running, running_config
from waits import holds_for, wait_until

from ssefan.config import UpstreamConfig
from ssefan.core.sse import Event, IdOnly, Overflow
from ssefan.stream.upstream import Upstream

BACKOFF_MAX = 0.2  # what fast_upstream() configures
RECONNECT_DELAY = re.compile(r"reconnecting to upstream in ([0-9.]+)s")


@contextmanager
def serving(
    upstream: FakeUpstream, tmp_path: Path, upstream_keys: dict[str, object], **route: object
) -> Iterator[SsefanProcess]:
    """ssefan with one route whose upstream is given in its mapping form."""
    config = multi_route_config(upstream, [{"path": "/events", "upstream": upstream_keys, **route}])
    with running_config(tmp_path, config) as ssefan:
        yield ssefan


def strs(ids: range) -> list[str | None]:
    return [str(i) for i in ids]


def streaming_lines(ssefan: SsefanProcess) -> int:
    """How often ssefan logged that an upstream response started streaming."""
    return sum(1 for line in list(ssefan.lines) if " streaming" in line and "upstream=" in line)


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("overlap", [0, 3], ids=["exact-replay", "replay-overlap-3"])
def test_reconnect_resumes_with_last_event_id_without_duplicates(
    upstream: FakeUpstream, tmp_path: Path, overlap: int
) -> None:
    with serving(upstream, tmp_path, fast_upstream(upstream)) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(1, 6):
                upstream.publish(f"e{i}", id=str(i))
            client.read_events(5)
            assert "last-event-id" not in upstream.requests[0].headers

            upstream.replay_overlap = overlap  # the app resends events ssefan already has
            upstream.drop_all()
            upstream.wait_requests(2)
            assert upstream.requests[1].headers.get("last-event-id") == "5"
            # Published while ssefan may still be reconnecting: the app's
            # history replay delivers them either way.
            for i in range(6, 9):
                upstream.publish(f"e{i}", id=str(i))
            client.read_events(8)
            upstream.publish("e9", id="9")  # a marker: nothing unexpected came before it
            events = client.read_events(9)
        finally:
            client.close()
        assert event_ids(events) == strs(range(1, 10))
        assert [e.data for e in events] == [f"e{i}" for i in range(1, 10)]
        # The ring holds no copies either: a resume from 2 is exact.
        resumed = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": "2"})
        try:
            assert event_ids(resumed.read_events(7)) == strs(range(3, 10))
            upstream.publish("e10", id="10")
            assert event_ids(resumed.read_events(8))[-1] == "10"
        finally:
            resumed.close()
    assert len(upstream.requests) == 2


def test_reconnects_after_every_drop_with_the_newest_id(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    # An app that does not replay: an id-less event after the last id can't be
    # told apart from a new one, so a replaying app would send it twice (see
    # test_channel: only events with ids are de-duplicated).
    upstream.replay = False
    with serving(upstream, tmp_path, fast_upstream(upstream)) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            for round_ in range(1, 4):
                upstream.publish(f"r{round_}", id=f"r{round_}")
                upstream.publish(f"anonymous {round_}")  # does not change the upstream id
                client.read_events(2 * round_)
                upstream.drop_all()
                upstream.wait_requests(round_ + 1)
                assert upstream.requests[round_].headers.get("last-event-id") == f"r{round_}"
        finally:
            client.close()
    assert [e.data for e in client.events] == [
        x for r in range(1, 4) for x in (f"r{r}", f"anonymous {r}")
    ]


def test_app_restart_is_survived_and_resumed(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The app goes away (connection refused for a while) and comes back on its port."""
    with serving(upstream, tmp_path, fast_upstream(upstream)) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(1, 4):
                upstream.publish(f"e{i}", id=str(i))
            client.read_events(3)
            upstream.close()  # the app stops: resets, then nothing listens
            wait_until(lambda: "ConnectionRefusedError" in ssefan.log_text(), what="refusals")

            restarted = FixedPortUpstream(upstream.port)
            restarted.history = list(upstream.history)  # the app keeps its history
            restarted.replay_overlap = 2
            try:
                restarted.start()
                for i in range(4, 6):  # published before ssefan is back: replayed to it
                    restarted.publish(f"e{i}", id=str(i))
                restarted.wait_requests(1)
                assert restarted.requests[0].headers.get("last-event-id") == "3"
                client.read_events(5)
                restarted.publish("e6", id="6")
                events = client.read_events(6)
            finally:
                restarted.close()
        finally:
            client.close()
    assert event_ids(events) == strs(range(1, 7))


# --------------------------------------------------------------------------- request


def test_upstream_request_headers(upstream: FakeUpstream, tmp_path: Path) -> None:
    headers = {"Authorization": "Bearer t", "X-Tenant": "acme"}
    config: dict[str, object] = {"url": upstream.url, "headers": headers}
    with serving(upstream, tmp_path, config) as ssefan:
        upstream.wait_requests(1)
        request = upstream.requests[0]
        log = ssefan.log_text()
    assert (request.method, request.target) == ("GET", "/events")
    headers = request.headers
    assert headers["host"] == f"127.0.0.1:{upstream.port}"
    assert headers["accept"] == "text/event-stream"
    assert headers["cache-control"] == "no-cache"
    assert headers["accept-encoding"] == "identity"
    assert headers["authorization"] == "Bearer t"
    assert headers["x-tenant"] == "acme"
    assert "last-event-id" not in headers
    assert "Bearer t" not in log  # secrets stay out of the log


# --------------------------------------------------------------------------- failures


def test_silent_upstream_trips_the_watchdog(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.stall = True  # a response head, then nothing at all
    with serving(upstream, tmp_path, fast_upstream(upstream, idle_timeout="500ms")) as ssefan:
        upstream.wait_requests(1)
        stalled_at = time.monotonic()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.stall = False
            upstream.wait_requests(2, timeout=5)
            waited = time.monotonic() - stalled_at
            wait_until(lambda: streaming_lines(ssefan) >= 2, what="second upstream stream")
            upstream.publish("alive again", id="1")
            assert event_ids(client.read_events(1)) == ["1"]
        finally:
            client.close()
        assert "read-idle watchdog" in ssefan.log_text()
    assert waited >= 0.4  # not before the idle timeout (allowing for clock granularity)


@pytest.mark.parametrize(
    ("knob", "value", "logged"),
    [
        pytest.param("status", 500, "status 500", id="status-500"),
        pytest.param("status", 404, "status 404", id="status-404"),
        pytest.param("content_type", "text/html", "content type 'text/html'", id="html"),
        pytest.param("content_type", "application/json", "application/json", id="json"),
    ],
)
def test_unusable_upstream_is_retried_with_backoff_then_recovers(
    upstream: FakeUpstream, tmp_path: Path, knob: str, value: object, logged: str
) -> None:
    good = getattr(upstream, knob)
    setattr(upstream, knob, value)
    with serving(upstream, tmp_path, fast_upstream(upstream)) as ssefan:
        client = SSEClient(ssefan.host, ssefan.port)  # clients are served meanwhile
        try:
            assert client.status == 200
            upstream.wait_requests(1)
            first = time.monotonic()
            upstream.wait_requests(10)
            spread = time.monotonic() - first
            wait_until(lambda: logged in ssefan.log_text(), what=f"log line with {logged!r}")
            assert streaming_lines(ssefan) == 0

            setattr(upstream, knob, good)
            wait_until(lambda: streaming_lines(ssefan) >= 1, what="recovery")
            upstream.publish("recovered", id="1")
            assert event_ids(client.read_events(1)) == ["1"]
        finally:
            client.close()
        delays = [float(d) for d in RECONNECT_DELAY.findall(ssefan.log_text())]
    # Backoff, not a busy loop: nine waits, uniform in [0, 0.05], [0, 0.1], then
    # [0, 0.2], add up to at least 0.1 s except with probability < 1e-7 (a
    # busy loop needs ~10 ms for ten requests).
    assert spread >= 0.1, f"10 requests within {spread:.3f}s"
    assert len(delays) >= 9 and all(0 <= d <= BACKOFF_MAX for d in delays), delays


@pytest.mark.parametrize("http10", [False, True], ids=["chunked", "http-1.0"])
def test_204_ends_streams_and_stops_reconnecting(
    upstream: FakeUpstream, tmp_path: Path, http10: bool
) -> None:
    with serving(upstream, tmp_path, fast_upstream(upstream)) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port, http10=http10)
        try:
            upstream.publish("before", id="1")
            client.read_events(1)
            upstream.status = 204  # "stop": the app has nothing more for anyone
            upstream.drop_all()
            upstream.wait_requests(2)
            client.read_until_closed()
            assert client.closed
        finally:
            client.close()
        late = SSEClient(ssefan.host, ssefan.port)
        try:
            assert late.status == 204
        finally:
            late.close()
        # Reconnects would come every <= 0.2 s; none may come at all.
        holds_for(lambda: len(upstream.requests) == 2, 0.6, "no request after 204")
        assert "204" in ssefan.log_text()
    assert [e.data for e in client.events] == ["before"]


@pytest.mark.parametrize(
    ("pieces", "logged"),
    [
        pytest.param(
            [b"\x00\x01\xfe\xff binary junk\n:comment\nbogus: field\nretry: soon\nid\x00: x\n\n"],
            None,
            id="garbage-lines",
        ),
        pytest.param([b"\xff\xfe\x00" * 50 + b"\r\r\n\n"], None, id="binary-and-stray-line-ends"),
        pytest.param([b"data: " + b"x" * 5000 + b"\n\n"], "over-long line", id="long-line"),
        pytest.param(
            [b"data: " + b"x" * 700, b"y" * 700, b"z" * 700 + b"\ndata: more\n\n"],
            "over-long line",
            id="long-line-in-pieces",
        ),
        pytest.param(
            [b"".join(b"data: " + b"x" * 500 + b"\n" for _ in range(10)) + b"\n"],
            "over-long event",
            id="long-event",
        ),
        pytest.param([b"data: " + b"x" * 5000], "over-long line", id="long-line-no-end-yet"),
    ],
)
def test_bad_upstream_bytes_are_dropped_and_the_stream_goes_on(
    upstream: FakeUpstream, tmp_path: Path, pieces: list[bytes], logged: str | None
) -> None:
    limits = fast_upstream(upstream, max_line_bytes="1KiB", max_event_bytes="2KiB")
    with serving(upstream, tmp_path, limits) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("before", id="1")
            for piece in pieces:
                upstream.send_raw(piece)
            # A blank line ends whatever the bad bytes left open; the next
            # event must then come through whole.
            upstream.send_raw(b"\n\n")
            upstream.publish("after", id="2")
            upstream.publish("and more", id="3")
            events = client.read_events(3)
        finally:
            client.close()
        if logged is not None:
            wait_until(lambda: logged in ssefan.log_text(), what=logged)
        assert len(upstream.requests) == 1  # no reconnect was needed
    assert [(e.data, e.id) for e in events] == [("before", "1"), ("after", "2"), ("and more", "3")]


def test_invalid_utf8_is_replaced_not_forwarded(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.send_raw(b"id: u\ndata: a\xffb\xc3\n\n")
            (event,) = client.read_events(1)
        finally:
            client.close()
    assert (event.data, event.id) == ("a\ufffdb\ufffd", "u")


# --------------------------------------------------------------------------- lazy mode


def test_lazy_route_subscribes_on_first_client_and_lingers(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    linger = 0.5
    lazy = {"mode": "lazy", "linger": f"{linger}s"}
    with serving(upstream, tmp_path, fast_upstream(upstream), **lazy) as ssefan:
        holds_for(lambda: upstream.accepted == 0, 0.5, "no upstream connection without clients")
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.wait_connected()
            upstream.publish("one", id="1")
            assert event_ids(client.read_events(1)) == ["1"]
            second = SSEClient(ssefan.host, ssefan.port)  # shares the subscription
            second.close()
        finally:
            client.close()
        left_at = time.monotonic()
        wait_until(lambda: upstream.active == 0, what="unsubscribe after linger")
        lingered = time.monotonic() - left_at
        assert lingered >= linger * 0.9, f"unsubscribed after {lingered:.2f}s"
        assert len(upstream.requests) == 1

        # The next client re-subscribes ssefan, which resumes from the last id.
        # (The client resumes too: one without an id would wait out the
        # upstream's catch-up first, see test_lazy_resubscribe_never_serves_stale_events.)
        again = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": "1"})
        try:
            upstream.wait_requests(2)
            assert upstream.requests[1].headers.get("last-event-id") == "1"
            wait_until(lambda: streaming_lines(ssefan) >= 2, what="second subscription")
            upstream.publish("two", id="2")
            assert event_ids(again.read_events(1)) == ["2"]
        finally:
            again.close()


def test_lazy_route_keeps_subscription_when_a_client_returns_within_linger(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    lazy = {"mode": "lazy", "linger": "5s"}
    with serving(upstream, tmp_path, fast_upstream(upstream), **lazy) as ssefan:
        first = SSEClient(ssefan.host, ssefan.port)
        upstream.wait_connected()
        first.close()
        holds_for(lambda: upstream.active == 1, 0.3, "subscription kept while lingering")
        back = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("still here", id="1")
            assert [e.data for e in back.read_events(1)] == ["still here"]
        finally:
            back.close()
        assert upstream.accepted == 1


# --------------------------------------------------------------------------- heartbeats


def test_idle_clients_get_comment_heartbeats(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running(upstream, tmp_path, heartbeat="200ms") as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            started = time.monotonic()
            pump_until(client, lambda: client.comments.count("") >= 3, 5, "three heartbeats")
            took = time.monotonic() - started
            assert client.events == []  # invisible to EventSource
        finally:
            client.close()
    assert took >= 0.3  # three heartbeats 0.2 s apart need at least ~0.4 s


def test_named_heartbeat_events_carry_the_newest_id(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running(upstream, tmp_path, heartbeat="200ms", heartbeat_event="ping") as ssefan:
        upstream.wait_connected()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("real", id="42")
            pump_until(
                client,
                lambda: sum(e.event == "ping" for e in client.events) >= 2,
                5,
                "two pings",
            )
        finally:
            client.close()
    at = [e.data for e in client.events].index("real")
    before, real, after = client.events[:at], client.events[at], client.events[at + 1 :]
    assert real.id == "42" and real.event == ""
    # With nothing held a ping has no id to repeat; after that, the newest id,
    # so a ping never moves a client's resume point.
    assert all((e.event, e.data, e.id) == ("ping", "", None) for e in before)
    assert after and all((e.event, e.data, e.id) == ("ping", "", "42") for e in after)


# --------------------------------------------------------------------------- backoff (in memory)


class NullSink:
    upstream_last_id = ""

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None: ...

    def upstream_connected(self) -> None: ...

    def upstream_disconnected(self) -> None: ...

    def upstream_stopped(self, status: int = 204) -> None: ...


@pytest.mark.parametrize(
    ("base", "cap", "hint", "attempt", "ceiling"),
    [
        pytest.param(0.05, 0.2, None, 0, 0.05, id="configured-base"),
        pytest.param(0.05, 0.2, None, 1, 0.1, id="doubles"),
        pytest.param(0.05, 0.2, None, 6, 0.2, id="capped"),
        pytest.param(1.0, 30.0, 2.0, 1, 4.0, id="upstream-retry-replaces-base"),
        pytest.param(1.0, 30.0, 0.0, 0, 0.1, id="upstream-retry-0-is-floored"),
        pytest.param(1.0, 30.0, 3600.0, 0, 30.0, id="upstream-retry-capped"),
    ],
)
def test_backoff_is_full_jitter_up_to_the_ceiling(
    base: float, cap: float, hint: float | None, attempt: int, ceiling: float
) -> None:
    config = UpstreamConfig(url="http://127.0.0.1:9/events", backoff_base=base, backoff_max=cap)
    upstream = Upstream(config, NullSink())
    upstream.retry_hint = hint
    delays = [upstream.backoff_delay(attempt) for _ in range(2000)]
    assert all(0 <= d <= ceiling for d in delays), max(delays)
    # Uniform over [0, ceiling]: 2000 draws reach both ends (P(miss) ~ 1e-44).
    assert max(delays) > 0.95 * ceiling and min(delays) < 0.05 * ceiling


class _FlakySink:
    """A sink whose first publish raises, as a bug in the fan-out would."""

    def __init__(self) -> None:
        self.upstream_last_id = ""
        self.published: list[str] = []
        self.calls = 0

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        for item in items:
            if isinstance(item, Event):
                self.published.append(item.data)
                self.upstream_last_id = item.id or self.upstream_last_id

    def upstream_connected(self) -> None:
        pass

    def upstream_disconnected(self) -> None:
        pass

    def upstream_stopped(self, status: int = 204) -> None:
        raise AssertionError("not a 204")


def test_an_internal_error_is_logged_and_the_route_reconnects(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    sink = _FlakySink()
    config = UpstreamConfig(url=upstream.url, backoff_base=0.01, backoff_max=0.05)

    async def scenario() -> None:
        runner = Upstream(config, sink, route="/flaky")
        runner.start()
        try:
            await asyncio.to_thread(upstream.wait_connected)
            await asyncio.to_thread(upstream.publish, "first", id="1")
            # The failed publish ends that connection; the route comes back.
            await asyncio.to_thread(upstream.wait_requests, 2)
            await asyncio.to_thread(upstream.wait_connected)
            await asyncio.to_thread(upstream.publish, "second", id="2")
            deadline = time.monotonic() + 10
            while "second" not in sink.published:
                assert time.monotonic() < deadline, sink.published
                await asyncio.sleep(0.01)
            assert runner.failures >= 1
            assert runner.last_error.startswith("internal error: RuntimeError")
        finally:
            runner.stop()
            await runner.wait_stopped()

    asyncio.run(scenario())
    assert any("internal error" in r.getMessage() for r in caplog.records)
