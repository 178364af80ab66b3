"""Replay over loopback: Last-Event-ID (header or query), gaps, start positions.

A client that resumes with an id ssefan still holds must get exactly the events
after it, then live ones: no loss and no duplicate, even while events flow.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sse_clients import SSEClient, event_ids
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, running
from waits import wait_until

GAP = "ssefan-gap"


@pytest.fixture
def ssefan_buffer_5(upstream: FakeUpstream, tmp_path: Path) -> Iterator[SsefanProcess]:
    """ssefan with a 5-event ring that has seen ids 1..10 (it holds 6..10)."""
    with running(upstream, tmp_path, buffer=5) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(1, 11):
                upstream.publish(f"e{i}", id=str(i))
            observer.read_events(10)
        finally:
            observer.close()
        yield ssefan


def strs(ids: range) -> list[str | None]:
    return [str(i) for i in ids]


@pytest.mark.parametrize(
    ("last_id", "expected"),
    [
        pytest.param("7", range(8, 12), id="middle"),
        pytest.param("6", range(7, 12), id="oldest-held"),
        pytest.param("10", range(11, 12), id="head-gets-only-live"),
    ],
)
def test_resume_from_a_held_id_is_exact(
    upstream: FakeUpstream, ssefan_buffer_5: SsefanProcess, last_id: str, expected: range
) -> None:
    ssefan = ssefan_buffer_5
    client = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": last_id})
    try:
        upstream.publish("e11", id="11")
        events = client.read_events(len(expected))
    finally:
        client.close()
    assert event_ids(events) == strs(expected)
    assert [e.data for e in events] == [f"e{i}" for i in expected]


@pytest.mark.parametrize(
    ("last_id", "on_gap", "reason", "expected"),
    [
        pytest.param("2", "replay", "evicted", range(6, 12), id="evicted-replay"),
        pytest.param("2", "live", "evicted", range(11, 12), id="evicted-live"),
        pytest.param("nope", "replay", "unknown", range(6, 12), id="unknown-replay"),
        pytest.param("nope", "live", "unknown", range(11, 12), id="unknown-live"),
        pytest.param("11", "replay", "unknown", range(6, 12), id="future-id-is-unknown"),
    ],
)
def test_gap_is_announced_in_band_then_route_policy(
    upstream: FakeUpstream,
    tmp_path: Path,
    last_id: str,
    on_gap: str,
    reason: str,
    expected: range,
) -> None:
    with running(upstream, tmp_path, buffer=5, on_gap=on_gap) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        client: SSEClient | None = None
        try:
            for i in range(1, 11):
                upstream.publish(f"e{i}", id=str(i))
            observer.read_events(10)
            client = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": last_id})
            upstream.publish("e11", id="11")
            events = client.read_events(1 + len(expected))
        finally:
            observer.close()
            if client is not None:
                client.close()
    gap, *rest = events
    assert gap.event == GAP
    assert json.loads(gap.data) == {
        "reason": reason,
        "last_event_id": last_id,
        "oldest_id": "6",
        "policy": on_gap,
    }
    # The gap event keeps the client's own id: reconnecting before the next
    # event must not move its resume point.
    assert gap.id == last_id
    assert event_ids(rest) == strs(expected)
    assert all(e.event == "" for e in rest)


@pytest.mark.parametrize(
    ("path", "headers", "expected"),
    [
        pytest.param("/events?last_event_id=7", {}, range(8, 12), id="last_event_id"),
        pytest.param("/events?lastEventId=7", {}, range(8, 12), id="lastEventId"),
        pytest.param("/events?evs_last_event_id=7", {}, range(8, 12), id="evs_last_event_id"),
        pytest.param("/events?foo=1&lastEventId=9&bar=2", {}, range(10, 12), id="among-others"),
        pytest.param(
            "/events?last_event_id=7", {"Last-Event-ID": "9"}, range(10, 12), id="header-wins"
        ),
        pytest.param(
            "/events?last_event_id=9", {"Last-Event-ID": "7"}, range(8, 12), id="header-wins-2"
        ),
        pytest.param("/events?other=7", {}, range(11, 12), id="unrelated-param-is-live"),
    ],
)
def test_resume_point_from_query_parameters(
    upstream: FakeUpstream,
    ssefan_buffer_5: SsefanProcess,
    path: str,
    headers: dict[str, str],
    expected: range,
) -> None:
    ssefan = ssefan_buffer_5
    client = SSEClient(ssefan.host, ssefan.port, path, headers=headers)
    try:
        upstream.publish("e11", id="11")
        events = client.read_events(len(expected))
    finally:
        client.close()
    assert event_ids(events) == strs(expected)


def test_query_parameter_is_percent_decoded(upstream: FakeUpstream, tmp_path: Path) -> None:
    odd = "order 7/b&c=ü"
    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        try:
            for event_id in ("a", odd, "c"):
                upstream.publish(f"after {event_id}", id=event_id)
            observer.read_events(3)
        finally:
            observer.close()
        client = SSEClient(ssefan.host, ssefan.port, f"/events?last_event_id={quote(odd)}")
        try:
            upstream.publish("live", id="d")
            events = client.read_events(2)
        finally:
            client.close()
    assert event_ids(events) == ["c", "d"]


def test_no_loss_or_duplicate_while_events_flow_during_replay(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    """Clients resume from many ids while a publisher never stops."""
    rng = random.Random(20240611)
    published = [0]
    stop = threading.Event()

    def publisher() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            upstream.publish(f"p{n}", id=str(n))
            published[0] = n
            if n % 10 == 0:
                time.sleep(0.001)  # pacing: events keep arriving across the connects

    with running(upstream, tmp_path, buffer=100_000) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        clients: list[tuple[int, SSEClient]] = []
        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        try:
            observer.read_events(20)
            for i in range(40):
                # An id ssefan has certainly relayed (the observer got it from
                # ssefan): sometimes the newest, sometimes far back.
                observer.pump()
                seen = [int(e.id or 0) for e in observer.events]
                resume_from = seen[-1] if i % 3 == 0 else rng.choice(seen)
                headers = {"Last-Event-ID": str(resume_from)} if i % 2 else {}
                path = "/events" if i % 2 else f"/events?lastEventId={resume_from}"
                clients.append(
                    (resume_from, SSEClient(ssefan.host, ssefan.port, path, headers=headers))
                )
            # Let a few more events flow after the last connect, then stop.
            target = published[0] + 50
            wait_until(lambda: published[0] >= target, what="more events published")
        finally:
            stop.set()
            thread.join(10)
        total = published[0]
        try:
            assert total > 100
            for resume_from, client in clients:
                expected = total - resume_from
                client.read_events(expected, timeout=15)
                assert event_ids(client.events) == strs(range(resume_from + 1, total + 1)), (
                    f"resumed from {resume_from}"
                )
        finally:
            observer.close()
            for _, client in clients:
                client.close()


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        pytest.param(None, range(11, 13), id="default-is-live"),
        pytest.param("live", range(11, 13), id="live"),
        pytest.param({"events": 3}, range(8, 13), id="last-3-events"),
        pytest.param({"events": 50}, range(1, 13), id="more-than-held"),
    ],
)
def test_start_position_for_clients_without_id(
    upstream: FakeUpstream, tmp_path: Path, start: object, expected: range
) -> None:
    keys: dict[str, object] = {} if start is None else {"start": start}
    with running(upstream, tmp_path, buffer=50, **keys) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(1, 11):
                upstream.publish(f"e{i}", id=str(i))
            observer.read_events(10)
        finally:
            observer.close()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("e11", id="11")
            upstream.publish("e12", id="12")
            events = client.read_events(len(expected))
        finally:
            client.close()
    assert event_ids(events) == strs(expected)


def test_start_by_age_replays_only_recent_events(upstream: FakeUpstream, tmp_path: Path) -> None:
    age = 1.0
    with running(upstream, tmp_path, start={"age": f"{age}s"}) as ssefan:
        upstream.wait_connected()
        observer = SSEClient(ssefan.host, ssefan.port)
        try:
            for i in range(1, 4):
                upstream.publish(f"old{i}", id=f"old{i}")
            observer.read_events(3)
            old_relayed_at = time.monotonic()  # ssefan stamped them before this
            # The condition is time itself: the old events must age past `age`.
            wait_until(lambda: time.monotonic() - old_relayed_at > age * 1.2, timeout=5)
            for i in range(1, 4):
                upstream.publish(f"new{i}", id=f"new{i}")
            observer.read_events(6)
        finally:
            observer.close()
        client = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("live", id="live")
            events = client.read_events(4)
        finally:
            client.close()
    assert event_ids(events) == ["new1", "new2", "new3", "live"]


def test_id_only_block_moves_the_resume_point(upstream: FakeUpstream, tmp_path: Path) -> None:
    with running(upstream, tmp_path) as ssefan:
        upstream.wait_connected()
        live = SSEClient(ssefan.host, ssefan.port)
        try:
            upstream.publish("five", id="5")
            upstream.publish("six", id="6")
            upstream.send_raw(b"id: 7\n\n", history_id="7")  # no data: the id still moves
            upstream.publish("after seven")  # no id of its own
            upstream.publish("eight", id="8")
            events = live.read_events(4)
        finally:
            live.close()
        assert [e.data for e in events] == ["five", "six", "after seven", "eight"]
        assert events[2].id not in (None, "", "6", "7")  # an assigned id, not 7's

        resumed = SSEClient(ssefan.host, ssefan.port, headers={"Last-Event-ID": "7"})
        try:
            upstream.publish("nine", id="9")
            got = resumed.read_events(3)
        finally:
            resumed.close()
    assert [e.data for e in got] == ["after seven", "eight", "nine"]
    assert got[0].event != GAP
