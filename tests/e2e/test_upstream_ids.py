"""Upstream ids after a reconnect, end to end: replays, reused ids, stale backlogs.

A real ssefan process in front of FakeUpstream on loopback. What is checked is
what clients get: after an upstream reconnect, an event is dropped only when
it really is a replay (same id and same bytes as one ssefan sent), an app
whose ids restart loses nothing and every id a client sees names one event,
and a new live client never gets the backlog an upstream resubscribe brings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from opsharness import admin_url, scrape, value
from sse_clients import SSEClient, event_ids
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, fast_upstream, multi_route_config, write_config
from waits import wait_until

REUSE_WARNING = "upstream reused event id"


@contextmanager
def serving(upstream: FakeUpstream, tmp_path: Path, **route: object) -> Iterator[SsefanProcess]:
    routes = [{"path": "/events", "upstream": fast_upstream(upstream), **route}]
    config = multi_route_config(upstream, routes, admin={"listen": "127.0.0.1:0"})
    proc = SsefanProcess(write_config(tmp_path / "ssefan.yaml", config)).start()
    try:
        yield proc
    finally:
        proc.stop()


def cut_upstream(upstream: FakeUpstream, connections: int) -> None:
    """End the app's open streams; ssefan reconnects (the `connections`th one)."""
    upstream.drop_all()
    upstream.wait_requests(connections)
    upstream.wait_connected()


def test_an_app_that_restarts_ids_per_connection_loses_nothing(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`for i in range(n): yield f"id: {i}..."` per connection: the second
    connection's 1..5 are new events, delivered, under ids of ssefan's."""
    upstream.replay = False  # this app ignores Last-Event-ID
    with serving(upstream, tmp_path) as proc:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        for i in range(1, 6):
            upstream.publish(f"first connection, step {i}", id=str(i))
        client.read_events(5)
        cut_upstream(upstream, 2)
        for i in range(1, 6):
            upstream.publish(f"second connection, step {i}", id=str(i))
        got = client.read_events(10)
        ids = event_ids(got)
        assert [e.data for e in got] == [
            *(f"first connection, step {i}" for i in range(1, 6)),
            *(f"second connection, step {i}" for i in range(1, 6)),
        ]
        assert ids[:5] == ["1", "2", "3", "4", "5"]
        assert len(set(ids)) == 10, f"an id names two events: {ids}"

        # The new ids resume exactly, like the app's own.
        resumed = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": str(ids[6])})
        assert event_ids(resumed.read_events(3)) == ids[7:]
        resumed.close()
        client.close()

        metrics = scrape(admin_url(proc))
        assert value(metrics, "ssefan_ids_reused_total", route="/events") == 5
        assert value(metrics, "ssefan_duplicates_dropped_total", route="/events") == 0
        log = proc.log_text()
        assert log.count(REUSE_WARNING) == 1, "one warning per upstream connection"
        assert "route=/events" in log and "honour Last-Event-ID" in log


def test_an_app_whose_counter_restarts_on_a_deploy_loses_nothing(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """The app restarts with an empty history and counts from 1 again: ids the
    ring holds (8..10) and ids it has evicted (1..7) alike are new events."""
    with serving(upstream, tmp_path, buffer=3) as proc:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        for i in range(1, 11):
            upstream.publish(f"before the deploy {i}", id=str(i))
        client.read_events(10)
        upstream.history.clear()  # the deploy: Last-Event-ID 10 means nothing now
        cut_upstream(upstream, 2)
        assert upstream.requests[-1].headers.get("last-event-id") == "10"
        for i in range(1, 11):
            upstream.publish(f"after the deploy {i}", id=str(i))
        got = client.read_events(20)[10:]
        assert [e.data for e in got] == [f"after the deploy {i}" for i in range(1, 11)]
        ids = event_ids(client.events)
        assert len(set(ids)) == 20, f"an id names two events: {ids}"
        metrics = scrape(admin_url(proc))
        assert value(metrics, "ssefan_ids_reused_total", route="/events") == 10
        assert value(metrics, "ssefan_duplicates_dropped_total", route="/events") == 0
        client.close()


def test_a_true_replay_after_a_reconnect_is_still_dropped(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """An app that resends the 3 events before the Last-Event-ID, byte for
    byte: they are replays, dropped, and nothing is counted as reused."""
    upstream.replay_overlap = 3
    with serving(upstream, tmp_path) as proc:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        for i in range(1, 6):
            upstream.publish(f"event {i}", id=str(i))
        client.read_events(5)
        cut_upstream(upstream, 2)
        upstream.publish("event 6", id="6")
        assert event_ids(client.read_events(6)) == ["1", "2", "3", "4", "5", "6"]
        metrics = scrape(admin_url(proc))
        assert value(metrics, "ssefan_duplicates_dropped_total", route="/events") == 3
        assert value(metrics, "ssefan_ids_reused_total", route="/events") == 0
        assert REUSE_WARNING not in proc.log_text()
        client.close()


def test_lazy_resubscribe_never_serves_stale_events(upstream: FakeUpstream, tmp_path: Path) -> None:
    """`mode: lazy`: the last client leaves, the subscription lingers and ends,
    the app goes on publishing. A new client without Last-Event-ID brings the
    subscription back; ssefan resumes it from the last id and the app sends
    the backlog. The new client gets none of it, only what comes after; a
    client that resumes gets the backlog from the ring."""
    with serving(upstream, tmp_path, mode="lazy", linger="200ms") as proc:
        first = SSEClient(proc.host, proc.port)
        upstream.wait_connected()
        for i in range(1, 4):
            upstream.publish(f"event {i}", id=str(i))
        first.read_events(3)
        first.close()
        wait_until(lambda: upstream.active == 0, what="the lazy subscription to end")
        for i in range(4, 51):  # published while nobody was subscribed
            upstream.publish(f"event {i}", id=str(i))

        live = SSEClient(proc.host, proc.port)  # start: live, no Last-Event-ID
        upstream.wait_requests(2)
        assert upstream.requests[1].headers.get("last-event-id") == "3"
        # Publish one event at a time until the live client has one: its first
        # comes after the backlog, whenever the catch-up window closed.
        published = 50
        while not live.events:
            assert published < 550, "the live client got nothing"
            published += 1
            upstream.publish(f"event {published}", id=str(published))
            live.sock.settimeout(0.02)
            try:
                live.pump()
            except TimeoutError:
                continue
        first_id = int(str(live.events[0].id))
        assert first_id > 50, f"the live client got the stale event {first_id}"

        resuming = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": "3"})
        expected = [str(i) for i in range(4, published + 1)]
        assert event_ids(resuming.read_events(len(expected))) == expected
        resuming.close()
        live.close()
