"""A real browser's EventSource against ssefan: headless Chromium over CDP.

The page comes from the app behind ssefan's pass-through (browser.PageApp),
so it shares one origin, and one keep-alive connection pool, with its
EventSources; it also fetch()es the app all along, which is what makes
Chromium send an EventSource's reconnect on a connection a fetch() used (the
bug report's `503, connectionReused=True`).

WHATWG HTML §9.2.2: a response that is not `200 text/event-stream` *fails*
the EventSource (readyState CLOSED, no more reconnects); a body that ends, or
a network error, *reestablishes* it. Every temporary refusal must therefore
look like the second, and these tests check that a page's EventSources never
end CLOSED and come back by themselves.

Chromium is Debian's `chromium`. Without it the tests are skipped, except
under CI (CI=true), where a missing browser is a failure.
"""

from __future__ import annotations

import signal
import socket
import sys
import threading
from pathlib import Path

import pytest
from browser import Page
from eventsource_page import CLOSED, CONNECTING, OPEN, PageApp, PageRecord
from faults import CutProxy, free_port
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import CommandProcess, SsefanProcess, fast_upstream, signal_proc, write_config
from waits import wait_until

from ssefan.ops.drain import MIN_DRAIN_RATE

# Longest refusal `retry:` (max_clients and auth_unavailable: 2-8 s) plus the
# time a reconnect takes: how long a refused EventSource may take to come back.
COMEBACK = 15.0


class Publisher:
    """Numbered events from a thread at a steady pace, until `stop()`."""

    def __init__(self, upstream: FakeUpstream, interval: float) -> None:
        self.upstream = upstream
        self.interval = interval
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):  # the pace of the app's events
            n += 1
            self.upstream.publish(f"event {n}", id=str(n))
            self.ids.append(str(n))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def config(upstream: FakeUpstream, app: PageApp, **route: object) -> dict[str, object]:
    """ssefan with the page app passed through and one stream route, /events."""
    return {
        "listen": "127.0.0.1:0",
        "app": app.url,
        "routes": [
            {"path": "/events", "upstream": fast_upstream(upstream), "heartbeat": "15s", **route}
        ],
    }


def serve(tmp_path: Path, cfg: dict[str, object]) -> SsefanProcess:
    return SsefanProcess(write_config(tmp_path / "ssefan.yaml", cfg)).start()


def page_url(origin: str, streams: int, fetch_ms: int = 100) -> str:
    return f"{origin}/page?streams={streams}&path=/events&fetch_ms={fetch_ms}"


def never_closed(record: PageRecord, page: Page) -> None:
    """No EventSource was failed by the browser, and every answer to one was
    `200 text/event-stream` (a refusal too: WHATWG HTML §9.2.2)."""
    failed = [i for i, s in enumerate(record.streams) if s.ever_closed]
    responses = page.stream_responses()
    assert not failed, (
        f"EventSource(s) {failed} were failed (CLOSED) by the browser:\n{record.describe()}\n"
        f"stream responses: {responses}"
    )
    bad = [r for r in responses if (r.status, r.mime_type) != (200, "text/event-stream")]
    assert not bad, f"EventSource requests answered with {bad}"


def assert_exact(ids: list[str], published: list[str], what: str) -> None:
    """`ids` is `published` from its first element on: nothing lost, nothing twice."""
    assert ids, f"{what}: no events"
    start = published.index(ids[0])
    expected = published[start : start + len(ids)]
    assert ids == expected, (
        f"{what}: lost {sorted(set(expected) - set(ids), key=int)[:10]},"
        f" twice {sorted({i for i in ids if ids.count(i) > 1}, key=int)[:10]}"
    )


# --------------------------------------------------------------------------- resume


def test_eventsource_resumes_after_cuts_with_no_gap_and_no_repeat(
    page: Page, page_app: PageApp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Three times, every connection is severed mid-stream (a TCP forwarder in
    front of ssefan closes both ends: to the browser exactly a server-side cut)
    while the app publishes 50 events a second. Each EventSource reconnects by
    itself with Last-Event-ID and its record is the published sequence."""
    proc = serve(tmp_path, config(upstream, page_app, retry="500ms"))
    proxy = CutProxy(proc.host, proc.port).start()
    try:
        upstream.wait_connected()
        page.goto(page_url(proxy.url(""), streams=2))
        page.wait_record(lambda r: all(s.ready_state == OPEN for s in r.streams), 10, "open")
        with Publisher(upstream, interval=0.02) as publisher:
            for cut in range(1, 4):
                seen = [len(s.ids) for s in page.record().streams]

                def flowing(r: PageRecord, seen: list[int] = seen) -> bool:
                    return all(len(s.ids) > n + 5 for s, n in zip(r.streams, seen, strict=True))

                def reopened(r: PageRecord, opens: int = cut + 1) -> bool:
                    return all(s.opens == opens and s.ready_state == OPEN for s in r.streams)

                page.wait_record(flowing, 10, f"events before cut {cut}")
                assert proxy.cut() > 0
                page.wait_record(reopened, 10, f"every EventSource reopened after cut {cut}")
            page.wait_record(lambda r: all(len(s.ids) > 0 for s in r.streams), 10, "events")
        published = publisher.ids
        record = page.wait_record(
            lambda r: all(s.ids[-1:] == published[-1:] for s in r.streams),
            10,
            f"the last event ({published[-1]})",
        )
    finally:
        proxy.close()
        proc.stop()
    never_closed(record, page)
    for i, stream in enumerate(record.streams):
        assert stream.gaps == 0, f"stream {i}: ssefan reported a gap"
        assert len([e for e in stream.errors if e[1] == CONNECTING]) == 3, stream.errors
        assert_exact(stream.ids, published, f"stream {i}")


# --------------------------------------------------------------------------- drain

# What systemd does between fork and exec for a socket-activated service: the
# socket at fd 3, LISTEN_FDS=1 and LISTEN_PID naming the process that will run
# ssefan. The test holds the socket the way systemd does, so the port accepts
# (into the backlog) while no ssefan runs.
_ACTIVATE = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ssefan', *sys.argv[2:]])\n"
)


def activated(config_path: Path, listener: socket.socket) -> CommandProcess:
    fd = listener.fileno()
    argv = [sys.executable, "-c", _ACTIVATE, str(fd), "serve", "--config", str(config_path)]
    return CommandProcess(config_path, argv, pass_fds=(fd,)).start()


@pytest.mark.slow  # waits out real EventSource retry delays
def test_eventsources_survive_a_drain_and_reconnect_to_the_next_instance(
    page: Page, page_app: PageApp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """SIGTERM with a 4 s drain window while the page has 5 EventSources and
    fetch()es every 50 ms (six connections: Chromium's limit per host). 800
    other clients keep the drain going for the whole window (MIN_DRAIN_RATE),
    so most runs see a page's EventSource, ended early with a 1-3 s `retry:`,
    reconnect while the process still drains, on a keep-alive connection a
    fetch() or an ended stream left in Chromium's pool: where a `503` failed
    the EventSource for good. The next instance starts on the same
    (socket-activated) port once the first has exited, as a systemd restart
    does. Every EventSource opens again by itself; none is ever CLOSED."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    port = listener.getsockname()[1]
    window, crowd_size = 4.0, 800
    assert crowd_size / MIN_DRAIN_RATE >= window  # the crowd fills the window
    cfg = {
        **config(upstream, page_app),
        "drain_window": f"{window}s",
        "shutdown_timeout": f"{2 * window + 2}s",
    }
    path = write_config(tmp_path / "ssefan.yaml", cfg)
    first = activated(path, listener)
    second: CommandProcess | None = None
    crowd: list[SSEClient] = []
    try:
        upstream.wait_connected()
        origin = f"http://127.0.0.1:{port}"
        crowd = [SSEClient("127.0.0.1", port) for _ in range(crowd_size)]
        assert all(c.status == 200 for c in crowd)
        page.goto(page_url(origin, streams=5, fetch_ms=50))
        page.wait_record(lambda r: all(s.ready_state == OPEN for s in r.streams), 10, "open")
        upstream.publish("before the drain", id="1")
        page.wait_record(lambda r: all(s.ids == ["1"] for s in r.streams), 10, "event 1")

        signal_proc(first, signal.SIGTERM)
        page.wait_record(
            lambda r: all(s.errors for s in r.streams), 10, "every stream ended by the drain"
        )
        assert first.proc is not None and first.proc.wait(2 * window + 2) == 0
        for client in crowd:
            client.close()
        record = page.record()
        never_closed(record, page)

        second = activated(path, listener)
        wait_until(lambda: len(upstream.requests) == 2 and upstream.active == 1, what="resub")
        page.wait_record(
            lambda r: all(s.ready_state == OPEN and s.opens >= 2 for s in r.streams),
            COMEBACK,
            "every EventSource open on the next instance",
        )
        upstream.publish("after the drain", id="2")
        fetched = record.fetches_ok
        record = page.wait_record(
            lambda r: all(s.ids[-1:] == ["2"] for s in r.streams) and r.fetches_ok > fetched,
            10,
            "event 2 on every stream, and the fetch()es going on",
        )
    finally:
        for client in crowd:
            client.close()
        first.stop()
        if second is not None:
            second.stop()
        listener.close()
    never_closed(record, page)
    for i, stream in enumerate(record.streams):
        assert all(state != CLOSED for _, state in stream.errors), (i, stream.errors)
        assert set(stream.refusals) <= {"shutting_down"}, (i, stream.refusals)


# --------------------------------------------------------------------------- max_clients


@pytest.mark.slow  # waits out real EventSource retry delays
def test_refused_over_max_clients_the_eventsources_retry_until_a_slot_frees(
    page: Page, page_app: PageApp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """max_clients: 2 and a page with 4 EventSources: two stream, two are
    refused. They stay CONNECTING (retrying), never CLOSED; once the page
    closes the two that stream, the refused ones get in by themselves."""
    proc = serve(tmp_path, config(upstream, page_app, max_clients=2))
    try:
        upstream.wait_connected()
        page.goto(page_url(proc.url, streams=4))
        record = page.wait_record(
            lambda r: (
                sum(s.ready_state == OPEN for s in r.streams) == 2
                and sum(bool(s.errors) for s in r.streams) == 2
            ),
            10,
            "two streams open and two refused",
        )
        never_closed(record, page)
        refused = [i for i, s in enumerate(record.streams) if s.errors]
        admitted = [i for i, s in enumerate(record.streams) if not s.errors]
        for i in admitted:
            page.evaluate(f"closeStream({i})")
        # Events flow all along: an event, not a readyState (a refusal opens
        # too, for a moment), proves a stream was admitted.
        with Publisher(upstream, interval=0.05):
            record = page.wait_record(
                lambda r: all(
                    r.streams[i].ids and r.streams[i].ready_state == OPEN for i in refused
                ),
                COMEBACK,
                f"the refused EventSources {refused} streaming once slots are free",
            )
    finally:
        proc.stop()
    never_closed(record, page)
    for i in refused:
        assert record.streams[i].refusals, f"stream {i} got no ssefan-retry event"
        assert set(record.streams[i].refusals) == {"max_clients"}, record.streams[i].refusals


# --------------------------------------------------------------------------- auth outage


@pytest.mark.slow  # waits out real EventSource retry delays
def test_eventsources_wait_out_an_auth_outage_and_open_when_it_is_back(
    page: Page, page_app: PageApp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The route's forward-auth endpoint is down (nothing listens on its
    port): the page's EventSources are refused as `auth_unavailable` and keep
    retrying, never CLOSED. When the auth service comes back on its port they
    open by themselves."""
    auth_port = free_port()
    auth = {"url": f"http://127.0.0.1:{auth_port}/auth", "timeout": "1s"}
    proc = serve(tmp_path, config(upstream, page_app, auth=auth))
    auth_app: PageApp | None = None
    try:
        upstream.wait_connected()
        page.goto(page_url(proc.url, streams=2))
        record = page.wait_record(
            lambda r: all(s.errors and s.ready_state != OPEN for s in r.streams),
            10,
            "both EventSources refused",
        )
        never_closed(record, page)
        # Each `open` so far was a refusal's (a 200 stream that says retry, then ends).
        assert all(s.opens == len(s.refusals) for s in record.streams), record.describe()

        auth_app = PageApp(auth_port).start()  # the auth service is back
        with Publisher(upstream, interval=0.05):
            record = page.wait_record(
                lambda r: all(s.ids and s.ready_state == OPEN for s in r.streams),
                COMEBACK,
                "both EventSources streaming once forward-auth answers",
            )
        assert auth_app.auth_calls >= 1  # asked (one answer may serve both: a cache)
    finally:
        proc.stop()
        if auth_app is not None:
            auth_app.close()
    never_closed(record, page)
    for i, stream in enumerate(record.streams):
        assert stream.refusals and set(stream.refusals) == {"auth_unavailable"}, (
            i,
            stream.refusals,
        )
