"""The channel in memory: fan-out, backpressure, slow-consumer policy, replay hand-over.

A fake transport records what the channel writes and can push back the way an
asyncio transport does: from inside `write`, by calling the protocol's
`pause_writing`, which the server forwards to `Channel.pause`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import pytest
from fake_transport import Client, FakeTransport

from ssefan.config import RouteConfig, StartConfig, UpstreamConfig
from ssefan.core.refusal import RefusalReason
from ssefan.core.sse import Event, IdOnly, Overflow, encode
from ssefan.stream.channel import GAP_EVENT, Channel, DisconnectReason, StreamBudget


def route(**keys: object) -> RouteConfig:
    base: dict[str, object] = {"heartbeat": 3600.0, "path": "/events"}
    base.update(keys)
    return RouteConfig(
        upstream=UpstreamConfig(url="http://127.0.0.1:9/events"),
        **base,  # type: ignore[arg-type]
    )


def make_channel(loop: asyncio.AbstractEventLoop, **keys: object) -> Channel:
    return Channel(route(**keys), loop=loop, clock=lambda: 1000.0)


def events(ids: range | list[int], prefix: str = "") -> list[Event | IdOnly | Overflow]:
    return [Event(f"payload {i}", id=f"{prefix}{i}") for i in ids]


def strs(ids: range | list[int]) -> list[str | None]:
    return [str(i) for i in ids]


# --------------------------------------------------------------------------- fan-out


def test_one_bytes_object_per_batch_goes_to_every_live_subscriber(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop)
    chunked = [Client(channel, chunked=True) for _ in range(3)]
    raw = [Client(channel, chunked=False) for _ in range(2)]
    for client in chunked + raw:
        channel.subscribe(client.sub, None)
        assert client.transport.writes == []  # live start, empty ring: nothing to send

    channel.publish(events(range(1, 4)))

    framed = chunked[0].transport.writes[0]
    payload = raw[0].transport.writes[0]
    for client in chunked:
        assert len(client.transport.writes) == 1
        assert client.transport.writes[0] is framed  # framed once, shared
    for client in raw:
        assert len(client.transport.writes) == 1
        assert client.transport.writes[0] is payload  # encoded and joined once, shared
    expected = b"".join(encode(e) for e in events(range(1, 4)) if isinstance(e, Event))
    assert payload == expected
    assert framed == b"%x\r\n%b\r\n" % (len(expected), expected)
    for client in chunked + raw:
        assert client.ids() == strs(range(1, 4))
    assert channel.stats.events_delivered == 3 * 5


def test_subscriber_sets_flow_control_limits(loop: asyncio.AbstractEventLoop) -> None:
    client = Client(make_channel(loop))
    high, low = client.transport.limits or (None, None)
    assert high is not None and low is not None and 0 < low < high


# --------------------------------------------------------------------------- backpressure


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "raw"])
def test_paused_subscriber_gets_no_live_writes_then_catches_up_exactly(
    loop: asyncio.AbstractEventLoop, chunked: bool
) -> None:
    channel = make_channel(loop)
    slow, fast = Client(channel, chunked=chunked), Client(channel, chunked=chunked)
    channel.subscribe(slow.sub, None)
    channel.subscribe(fast.sub, None)
    channel.publish(events([1]))

    slow.pause_on_next_write()
    channel.publish(events([2]))  # pushes back while this write is being buffered
    writes_when_paused = len(slow.transport.writes)
    channel.publish(events([3, 4]))
    channel.publish(events([5]))
    assert len(slow.transport.writes) == writes_when_paused  # no live writes while paused
    assert slow.ids() == strs(range(1, 3))

    channel.resume(slow.sub)
    assert slow.ids() == strs(range(1, 6))  # exactly what it missed: no gap, no duplicate

    channel.publish(events([6, 7]))
    assert slow.transport.writes[-1] is fast.transport.writes[-1]  # back on the shared path
    assert slow.ids() == fast.ids() == strs(range(1, 8))
    assert not slow.transport.aborted and slow.reasons == []


def test_pause_during_catch_up_resumes_from_where_it_stopped(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # Events big enough that a replay takes several bounded slices, and a
    # transport that pushes back on every slice while events keep coming.
    channel = make_channel(loop, max_client_lag_bytes=64 << 20)
    big = "x" * 30_000
    channel.publish([Event(big, id=str(i)) for i in range(1, 21)])
    other = Client(channel)
    channel.subscribe(other.sub, None)
    client = Client(channel)
    client.pause_on_next_write()
    channel.subscribe(client.sub, "1")
    live: list[str | None] = []
    for round_ in range(1, 100):
        if not client.sub.paused:
            break
        if round_ <= 5:
            live.append(f"live{round_}")
            channel.publish([Event(big, id=live[-1])])
        client.pause_on_next_write()
        channel.resume(client.sub)
    client.transport.on_write = None
    assert not client.sub.paused and not client.transport.aborted
    assert client.ids() == strs(range(2, 21)) + live
    slices = len(client.transport.writes)
    assert slices >= 5  # it really went in several bounded slices
    channel.publish(events([99]))
    assert client.transport.writes[-1] is other.transport.writes[-1]  # live again
    assert client.ids()[-1] == "99"


# --------------------------------------------------------------------------- slow-consumer policy


@pytest.mark.parametrize(
    ("buffered", "events_published"),
    [
        pytest.param(0, 11, id="ring-lag-alone"),
        pytest.param(900, 2, id="transport-buffer-counts-too"),
    ],
)
def test_paused_subscriber_past_lag_limit_is_cut_off_as_slow(
    loop: asyncio.AbstractEventLoop, buffered: int, events_published: int
) -> None:
    channel = make_channel(loop, max_client_lag_bytes=1000)
    client, other = Client(channel), Client(channel)
    channel.subscribe(client.sub, None)
    channel.subscribe(other.sub, None)
    channel.pause(client.sub)
    client.transport.buffered = buffered
    size = len(encode(Event("y" * 80, id="0000")))
    assert size * (events_published - 1) + buffered <= 1000 < size * events_published + buffered

    for i in range(events_published - 1):
        channel.publish([Event("y" * 80, id=f"{i:04}")])
    assert not client.transport.aborted  # at the limit, not past it
    channel.publish([Event("y" * 80, id="last")])

    assert client.transport.is_aborted() and client.sub.closed
    assert client.reasons == [DisconnectReason.SLOW]
    assert channel.stats.disconnects[DisconnectReason.SLOW] == 1
    assert channel.client_count == 1
    assert other.ids()[-1] == "last" and not other.transport.aborted


def test_paused_subscriber_whose_cursor_leaves_the_ring_is_cut_off_as_evicted(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop, buffer=3)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish(events([1]))
    channel.pause(client.sub)  # it needs seq 1 onwards
    channel.publish(events([2, 3]))
    channel.publish(events([4]))  # ring holds 2..4: still resumable
    assert not client.transport.aborted
    channel.publish(events([5]))  # 2 is gone

    assert client.transport.is_aborted()
    assert client.reasons == [DisconnectReason.EVICTED]
    assert channel.stats.disconnects[DisconnectReason.EVICTED] == 1
    assert channel.client_count == 0
    # ...and resuming by reconnecting with its last id says "evicted".
    again = Client(channel)
    channel.subscribe(again.sub, "1")
    gap = again.decoded().events[0]
    assert gap.event == GAP_EVENT and json.loads(gap.data)["reason"] == "evicted"
    assert [e.id for e in again.decoded().events[1:]] == strs(range(3, 6))


# --------------------------------------------------------------------------- replay hand-over


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "raw"])
@pytest.mark.parametrize(
    ("last_id", "expected_replay"),
    [
        pytest.param("4", range(5, 11), id="middle"),
        pytest.param("1", range(2, 11), id="oldest"),
        pytest.param("10", range(11, 11), id="head"),
    ],
)
def test_replay_then_live_is_exact(
    loop: asyncio.AbstractEventLoop, chunked: bool, last_id: str, expected_replay: range
) -> None:
    channel = make_channel(loop)
    channel.publish(events(range(1, 11)))
    client = Client(channel, chunked=chunked)
    channel.subscribe(client.sub, last_id)
    assert client.ids() == strs(expected_replay)
    channel.publish(events([11]))
    channel.publish(events([12, 13]))
    assert client.ids() == strs([*expected_replay, 11, 12, 13])
    assert channel.stats.replay_hits == 1


@pytest.mark.parametrize(
    ("on_gap", "expected"),
    [pytest.param("replay", range(1, 6), id="replay"), pytest.param("live", range(0), id="live")],
)
def test_unknown_id_gets_gap_event_then_policy(
    loop: asyncio.AbstractEventLoop, on_gap: str, expected: range
) -> None:
    channel = make_channel(loop, on_gap=on_gap)
    channel.publish(events(range(1, 6)))
    client = Client(channel)
    channel.subscribe(client.sub, "nope")
    first, *rest = client.decoded().events
    assert first.event == GAP_EVENT
    assert json.loads(first.data) == {
        "reason": "unknown",
        "last_event_id": "nope",
        "oldest_id": "1",
        "policy": on_gap,
    }
    assert [e.id for e in rest] == strs(expected)
    channel.publish(events([6]))
    assert client.ids()[-1] == "6"
    assert channel.stats.replay_misses == 1


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        pytest.param(StartConfig(), range(0), id="live"),
        pytest.param(StartConfig(kind="events", count=3), range(8, 11), id="events-3"),
        pytest.param(
            StartConfig(kind="events", count=50), range(1, 11), id="events-more-than-held"
        ),
    ],
)
def test_start_position_without_id(
    loop: asyncio.AbstractEventLoop, start: StartConfig, expected: range
) -> None:
    channel = make_channel(loop, start=start)
    channel.publish(events(range(1, 11)))
    client = Client(channel)
    channel.subscribe(client.sub, None)
    assert client.ids() == strs(expected)


def test_start_by_age_uses_event_times(loop: asyncio.AbstractEventLoop) -> None:
    now = [100.0]
    channel = Channel(
        route(start=StartConfig(kind="age", age=5.0)), loop=loop, clock=lambda: now[0]
    )
    for i in range(1, 11):
        now[0] = 100.0 + i  # event i at t=100+i
        channel.publish(events([i]))
    client = Client(channel)
    channel.subscribe(client.sub, None)  # at t=110: events from t>=105
    assert client.ids() == strs(range(5, 11))


# --------------------------------------------------------------------------- upstream side


def test_upstream_replay_of_held_events_is_dropped(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish(events(range(1, 6)))
    assert channel.upstream_last_id == "5"

    channel.upstream_connected()  # reconnected with Last-Event-ID: 5; the app resends 3..5
    channel.publish(events(range(3, 9)))
    assert client.ids() == strs(range(1, 9))
    assert channel.stats.duplicates_dropped == 3
    # Once a new event came, a held id is no replay any more: the event is
    # delivered, under an id of ssefan's so that "3" still names one event.
    channel.publish(events([3]))
    assert client.ids()[:-1] == strs(range(1, 9))
    assert str(client.ids()[-1]).startswith(channel.intake.id_prefix)
    assert channel.stats.ids_reused == 1


def test_id_only_block_moves_the_resume_point(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    channel.publish([*events([5, 6]), IdOnly("7"), Event("after seven")])
    assert channel.upstream_last_id == "7"
    client = Client(channel)
    channel.subscribe(client.sub, "7")
    decoded = client.decoded()
    assert [e.data for e in decoded.events] == ["after seven"]
    assert decoded.events[0].id not in (None, "", "7")


def test_overflow_is_counted_and_the_batch_goes_on(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish([*events([1]), Overflow("line", 1025), *events([2])])
    assert client.ids() == strs([1, 2])
    assert channel.stats.overflows == 1


def test_assigned_ids_are_short_cors_safe_and_resumable(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    channel.publish([Event(f"anonymous {i}") for i in range(5)])
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish([Event("one more")])
    ids = client.ids()
    assert len(ids) == 1
    ring = channel.ring
    assigned = [ring.id_at(seq) for seq in range(ring.first_seq, ring.next_seq)]
    assert len(set(assigned)) == 6
    for event_id in assigned:
        assert 0 < len(event_id.encode()) <= 128
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in event_id)
    resumed = Client(channel)
    channel.subscribe(resumed.sub, assigned[2])
    assert [e.data for e in resumed.decoded().events] == [
        "anonymous 3",
        "anonymous 4",
        "one more",
    ]


# --------------------------------------------------------------------------- ending streams


def test_upstream_204_ends_every_stream(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    live, paused = Client(channel), Client(channel)
    channel.subscribe(live.sub, None)
    channel.subscribe(paused.sub, None)
    channel.pause(paused.sub)
    channel.upstream_stopped()
    assert channel.stopped_by_upstream and channel.client_count == 0
    assert live.transport.writes[-1] == b"0\r\n\r\n" and live.transport.closed
    assert live.decoded().ended
    assert paused.transport.aborted  # a stuck client would never flush a close
    assert live.reasons == paused.reasons == [DisconnectReason.UPSTREAM_STOPPED]


# --------------------------------------------------------------------------- heartbeat


async def writes_reach(transport: FakeTransport, n: int, within: float = 5.0) -> None:
    """Wait until `transport` has had `n` writes (woken by the write itself)."""
    reached = asyncio.Event()
    transport.on_write = lambda _: reached.set() if len(transport.writes) >= n else None
    async with asyncio.timeout(within):
        await reached.wait()
    transport.on_write = None


@pytest.mark.parametrize(
    ("heartbeat_event", "expected_ping"),
    [
        pytest.param(None, None, id="comment"),
        pytest.param("ping", ("ping", "", "7"), id="named-event-with-newest-id"),
    ],
)
def test_heartbeat_is_one_shared_write_to_live_subscribers(
    loop: asyncio.AbstractEventLoop,
    heartbeat_event: str | None,
    expected_ping: tuple[str, str, str] | None,
) -> None:
    channel = Channel(
        route(heartbeat=0.05, heartbeat_event=heartbeat_event), loop=loop, clock=loop.time
    )
    channel.publish(events([7]))
    live = [Client(channel, chunked=True), Client(channel, chunked=True)]
    raw, paused = Client(channel, chunked=False), Client(channel)
    for client in [*live, raw, paused]:
        channel.subscribe(client.sub, None)
    channel.pause(paused.sub)
    channel.start()
    try:
        loop.run_until_complete(writes_reach(live[0].transport, 2))
    finally:
        channel.close()
    first = live[0].transport.writes[0]
    assert all(c.transport.writes[0] is first for c in live)  # one object for all
    assert paused.transport.writes == []  # a paused client gets nothing live
    for client in [*live, raw]:
        decoded = client.decoded()
        if expected_ping is None:
            assert decoded.comments[:2] == ["", ""] and decoded.events == []
        else:
            pings = [(e.event, e.data, e.id) for e in decoded.events]
            assert len(pings) >= 2 and set(pings) == {expected_ping}


# --------------------------------------------------------------------------- review fixes


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param({"buffer": 3}, id="batch-over-count-bound"),
        pytest.param({"buffer_bytes": 40}, id="batch-over-byte-bound"),
    ],
)
def test_a_batch_larger_than_the_ring_reaches_live_clients_whole(
    loop: asyncio.AbstractEventLoop, keys: dict[str, object]
) -> None:
    channel = make_channel(loop, **keys)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish(events(range(1, 6)))  # one upstream read, bigger than the ring
    assert client.ids() == strs(range(1, 6))
    assert channel.ring.newest_id == "5"


def test_upstream_replay_of_evicted_ids_is_dropped_too(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop, buffer=3)
    channel.publish(events(range(1, 6)))  # the ring holds 3..5; 1..2 were evicted
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.upstream_connected()
    channel.publish(events(range(2, 8)))  # the app replays from 2
    assert client.ids() == strs([6, 7])
    assert channel.stats.duplicates_dropped == 4


@pytest.mark.parametrize(
    "upstream_id", [" 42", "42 ", "a\x0bb", "a\x0cb"], ids=["lead", "trail", "vt", "ff"]
)
def test_ids_that_cannot_come_back_as_a_header_are_replaced(
    loop: asyncio.AbstractEventLoop, upstream_id: str
) -> None:
    channel = make_channel(loop)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish([Event("x", id=upstream_id)])
    (got,) = client.ids()
    assert got is not None and got != upstream_id and got.strip() == got
    assert channel.upstream_last_id == upstream_id  # still what the app is told


def test_a_closed_channel_ends_a_late_subscriber_at_once(loop: asyncio.AbstractEventLoop) -> None:
    channel = make_channel(loop)
    channel.close()
    client = Client(channel)
    channel.subscribe(client.sub, None)
    assert client.reasons == [DisconnectReason.DRAIN]
    assert channel.client_count == 0
    assert channel.stats.connects == 0


# --------------------------------------------------------------------------- ids after a reconnect


def test_a_reused_id_with_new_content_is_delivered_under_an_id_of_ours(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish(events(range(1, 4)))
    channel.upstream_connected()
    # The app's new connection counts from 1 again, with other payloads.
    channel.publish([Event(f"new {i}", id=str(i)) for i in range(1, 4)])
    ids = client.ids()
    assert ids[:3] == strs(range(1, 4))
    assert all(str(i).startswith(channel.intake.id_prefix) for i in ids[3:])
    assert len(set(ids)) == 6
    assert [e.data for e in client.decoded().events][3:] == ["new 1", "new 2", "new 3"]
    assert (channel.stats.ids_reused, channel.stats.duplicates_dropped) == (3, 0)
    # A resume from one of our ids is exact.
    resumed = Client(channel)
    channel.subscribe(resumed.sub, ids[3])
    assert resumed.ids() == ids[4:]


def test_an_id_repeated_within_one_connection_names_two_events(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.publish([Event("a", id="7"), Event("b", id="7")])
    ids = client.ids()
    assert ids[0] == "7" and ids[1] != "7"
    assert channel.ring.seq_of("7") == 0  # "7" still names the first


def test_a_replayed_id_only_block_is_dropped_and_a_reused_one_ignored(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop)
    channel.publish([*events([1]), IdOnly("2")])
    channel.upstream_connected()
    channel.publish([IdOnly("2"), *events([3])])
    assert channel.stats.duplicates_dropped == 1
    channel.publish([IdOnly("2")])  # after new events: names nothing new
    assert channel.ring.newest_id == "3"


class StubSource:
    """A source that only records being started (the channel drives the rest)."""

    def __init__(self) -> None:
        self.running = False

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


def run_until(loop: asyncio.AbstractEventLoop, condition: Callable[[], bool]) -> None:
    """Run the loop's timers until `condition` holds (at most 2 s)."""
    deadline = loop.time() + 2.0
    while not condition():
        assert loop.time() < deadline, "condition never held"
        loop.run_until_complete(asyncio.sleep(0.005))


def test_a_live_client_waits_out_the_catch_up_backlog(loop: asyncio.AbstractEventLoop) -> None:
    channel = Channel(route(mode="lazy"), loop=loop)
    source = StubSource()
    channel.attach_source(source)
    channel.publish(events(range(1, 4)))  # an earlier subscription's events
    assert channel.upstream_last_id == "3"

    client = Client(channel)
    channel.subscribe(client.sub, None)  # the upstream is not streaming yet
    assert source.running and channel.client_count == 1
    channel.upstream_connected()  # resumed with Last-Event-ID: 3
    channel.publish(events(range(4, 40)))  # the app's backlog since 3
    channel.publish(events(range(40, 60)))
    assert client.ids() == []
    run_until(loop, lambda: channel._catch_up_handle is None)
    channel.publish(events([60]))
    assert client.ids() == ["60"]
    # The backlog filled the ring for clients that resume.
    resuming = Client(channel)
    channel.subscribe(resuming.sub, "3")
    assert resuming.ids() == strs(range(4, 61))


def test_without_a_resume_id_a_waiting_client_joins_as_the_upstream_answers(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = Channel(route(), loop=loop)
    channel.attach_source(StubSource())
    client = Client(channel)
    channel.subscribe(client.sub, None)
    channel.upstream_connected()  # a first connection: no Last-Event-ID, no backlog
    channel.publish(events([1]))
    assert client.ids() == ["1"]


def test_a_waiting_client_can_leave_and_gets_heartbeats(loop: asyncio.AbstractEventLoop) -> None:
    channel = Channel(route(heartbeat=0.01), loop=loop)
    channel.attach_source(StubSource())
    channel.start()
    staying, leaving = Client(channel), Client(channel)
    channel.subscribe(staying.sub, None)
    channel.subscribe(leaving.sub, None)
    channel.unsubscribe(leaving.sub)
    assert channel.client_count == 1
    run_until(loop, lambda: bool(staying.transport.writes))
    assert staying.decoded().events == [] and b":" in b"".join(staying.transport.writes)
    channel.close()


# --------------------------------------------------------------------------- stream accounting


def test_channels_sharing_a_budget_count_their_streams_in_and_out(
    loop: asyncio.AbstractEventLoop,
) -> None:
    budget = StreamBudget(limit=2)
    first = Channel(route(path="/a"), loop=loop, budget=budget)
    second = Channel(route(path="/b"), loop=loop, budget=budget)
    a, b = Client(first), Client(second)
    first.subscribe(a.sub, None)
    assert second.admits() and budget.open == 1
    second.subscribe(b.sub, None)
    assert budget.open == 2 and not first.admits() and not second.admits()
    first.unsubscribe(a.sub)  # the client went away
    assert budget.open == 1 and first.admits()
    second.end_stream(b.sub, DisconnectReason.DRAIN)
    second.unsubscribe(b.sub)  # its connection_lost after: counted once
    assert budget.open == 0


def test_a_closed_channel_and_the_route_cap_keep_the_count_exact(
    loop: asyncio.AbstractEventLoop,
) -> None:
    budget = StreamBudget(limit=10)
    channel = Channel(route(max_clients=1), loop=loop, budget=budget)
    client = Client(channel)
    channel.subscribe(client.sub, None)
    assert not channel.admits() and budget.open == 1  # the route's cap, not the budget
    channel.close()
    assert budget.open == 0
    late = Client(channel)
    channel.subscribe(late.sub, None)  # ended at once: in and out
    assert budget.open == 0 and late.reasons == [DisconnectReason.DRAIN]


def test_a_refusal_for_max_clients_counts_as_a_limit_ending(
    loop: asyncio.AbstractEventLoop,
) -> None:
    channel = make_channel(loop)
    channel.refused(RefusalReason.MAX_CLIENTS)
    channel.refused(RefusalReason.SHUTTING_DOWN)
    assert channel.stats.refusals[RefusalReason.MAX_CLIENTS] == 1
    assert channel.stats.refusals[RefusalReason.SHUTTING_DOWN] == 1
    assert channel.stats.disconnects[DisconnectReason.LIMIT] == 1
