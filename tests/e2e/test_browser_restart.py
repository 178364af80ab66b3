"""A real browser's EventSource across ssefan restarts with state_dir: headless Chromium over CDP.

The page is served by the app behind ssefan's pass-through (so it shares an
origin with its EventSources) and records every id its EventSources get,
every `open` and `error`, and any `ssefan-gap` (tests/support/eventsource_page.py).
ssefan is stopped with SIGTERM and started again on its port while the app
publishes; the browser reconnects by itself with Last-Event-ID (WHATWG HTML
§9.2.3), after the drain's `retry:`, to a process whose ring was restored
before it listened.

Chromium is Debian's `chromium`. Without it the test is skipped, except
under CI (CI=true), where a missing browser is a failure (browser.chromium_binary).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from browser import Page
from eventsource_page import CLOSED, OPEN, PageApp, PageRecord
from faults import free_port
from restarts import Publisher, assert_exact, restart, restored, state_config, stream_route
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, write_config

RESTARTS = 3
STREAMS = 2
RATE = 20.0  # events a second
# The drain's `retry:` is up to 3 s (ssefan.ops.drain.DRAIN_RETRY_MS); a
# reconnect that meets no listener yet waits one more `retry:`.
COMEBACK = 15.0


def past(n: int) -> Callable[[PageRecord], bool]:
    """Every EventSource of the page has an event numbered above `n`."""
    return lambda r: all(s.ids and int(s.ids[-1]) > n for s in r.streams)


def test_eventsources_across_three_restarts_miss_and_repeat_nothing(
    page: Page, page_app: PageApp, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A page with 2 EventSources while the app publishes 20 events a second;
    ssefan is restarted with SIGTERM 3 times on its port, with state_dir.
    Each EventSource comes back by itself every time, never CLOSED, and its
    record of ids is the published sequence: none missing, none repeated,
    no `ssefan-gap`."""
    port = free_port()
    config = state_config(
        port, tmp_path / "state", [stream_route(upstream, retry="500ms")], app=page_app.url
    )
    procs = [SsefanProcess(write_config(tmp_path / "ssefan.yaml", config)).start()]
    try:
        upstream.wait_connected()
        page.goto(f"http://127.0.0.1:{port}/page?streams={STREAMS}&path=/events")
        page.wait_record(lambda r: all(s.ready_state == OPEN for s in r.streams), 10, "open")
        with Publisher(upstream, RATE) as publisher:
            for n in range(RESTARTS):
                page.wait_record(
                    past(publisher.last), COMEBACK, f"events from process {n + 1} on every stream"
                )
                new = restart(procs)
                assert len(restored(new)) == 1, new.log_text()
            page.wait_record(past(publisher.last), COMEBACK, "events after the last restart")
        published = [str(n) for n in publisher.published]
        record = page.wait_record(
            lambda r: all(s.ids[-1:] == published[-1:] for s in r.streams),
            10,
            f"the last event ({published[-1]})",
        )
    finally:
        for proc in procs:
            proc.stop()

    failed = [i for i, s in enumerate(record.streams) if s.ever_closed]
    assert not failed, f"EventSource(s) {failed} were CLOSED:\n{record.describe()}"
    for i, stream in enumerate(record.streams):
        assert stream.gaps == 0, f"stream {i}: {stream.gaps} ssefan-gap:\n{record.describe()}"
        assert stream.ready_state != CLOSED
        assert stream.opens >= RESTARTS + 1, f"stream {i}:\n{record.describe()}"
        assert_exact(stream.ids, published, f"stream {i}")
        assert stream.ids[0] == "1", f"stream {i} missed the start: {stream.ids[:3]}"
