"""A template route's channels in memory: made per key, freed after linger, bounded.

The source of each key is a recorder (no socket): the tests drive what the
app would do (events, a 404) through the channel's sink methods.
"""

from __future__ import annotations

import asyncio

from fake_transport import Client

from ssefan.config import KeyConfig, RouteConfig, UpstreamConfig
from ssefan.core.refusal import RefusalReason
from ssefan.core.ring import RingBudget
from ssefan.core.sse import Event
from ssefan.core.template import ChannelKey
from ssefan.stream.channel import Channel, DisconnectReason, StreamBudget
from ssefan.stream.keyed import KEY_GONE_SECONDS, ChannelBudget, CloseReason, KeyedChannels
from ssefan.stream.upstream import UpstreamCounts


class Recorder:
    """A key's source: remembers the settings it was made with and its runs."""

    def __init__(self, upstream: UpstreamConfig, label: str) -> None:
        self.upstream = upstream
        self.label = label
        self.running = False
        self.starts = 0

    def start(self) -> None:
        self.running = True
        self.starts += 1

    def stop(self) -> None:
        self.running = False


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Setup:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        max_channels: int = 100,
        ring_budget: RingBudget | None = None,
        **keys: object,
    ) -> None:
        self.loop = loop
        self.clock = Clock()
        self.sources: dict[str, Recorder] = {}
        self.channel_budget = ChannelBudget(max_channels)
        self.budget = StreamBudget(1000)
        self.family = self.make(ring_budget=ring_budget, **keys)

    def make(self, *, ring_budget: RingBudget | None = None, **keys: object) -> KeyedChannels:
        return KeyedChannels(
            template_route(**keys),
            loop=self.loop,
            budget=self.budget,
            channel_budget=self.channel_budget,
            ring_budget=ring_budget,
            make_source=self.source,
            clock=self.clock,
        )

    def source(
        self, channel: Channel, upstream: UpstreamConfig, label: str, counts: UpstreamCounts
    ) -> Recorder:
        recorder = Recorder(upstream, label)
        self.sources[upstream.url] = recorder
        return recorder

    def key(self, path: str) -> ChannelKey:
        key = self.family.match(path, "")
        assert key is not None, path
        return key

    def client(self, path: str, family: KeyedChannels | None = None) -> Client:
        family = family or self.family
        key = family.match(path, "")
        assert key is not None
        channel = family.open(key)
        client = Client(channel)
        channel.subscribe(client.sub, None)
        return client

    def turn(self) -> None:
        """Let the loop run what is due now (linger 0 timers)."""
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.run_until_complete(asyncio.sleep(0))


def template_route(**keys: object) -> RouteConfig:
    base: dict[str, object] = {
        "path": "/jobs/{job}/progress",
        "upstream": UpstreamConfig(
            url="http://127.0.0.1:9/jobs/{job}/progress?v=1",
            headers=(("X-Job", "{job}"),),
        ),
        "heartbeat": 3600.0,
        "mode": "lazy",
        "linger": 0.0,
        "key": None,
    }
    base.update(keys)
    if base["key"] is None:
        del base["key"]
    return RouteConfig(**base)  # type: ignore[arg-type]


def test_each_key_gets_one_channel_and_one_source_with_the_key_filled_in(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop)
    a1, a2, b = (
        setup.client("/jobs/a/progress"),
        setup.client("/jobs/a/progress"),
        setup.client("/jobs/b-2/progress"),
    )
    assert a1.channel is a2.channel and a1.channel is not b.channel
    assert setup.channel_budget.live == 2 and setup.family.opened == 2
    source = setup.sources["http://127.0.0.1:9/jobs/a/progress?v=1"]
    assert source.running and source.upstream.headers == (("X-Job", "a"),)
    assert source.label == "/jobs/{job}/progress key=a"
    assert set(setup.sources) == {
        "http://127.0.0.1:9/jobs/a/progress?v=1",
        "http://127.0.0.1:9/jobs/b-2/progress?v=1",
    }
    # Each key's events reach its own clients only; the route's counters sum them.
    a1.channel.upstream_connected()  # the apps answer: waiting clients go live
    b.channel.upstream_connected()
    a1.channel.publish([Event("for a", id="1")])
    b.channel.publish([Event("for b", id="1"), Event("again b", id="2")])
    assert [e.data for e in a2.decoded().events] == ["for a"]
    assert [e.data for e in b.decoded().events] == ["for b", "again b"]
    assert setup.family.stats.events_received == 3
    assert setup.family.client_count == 3 and setup.budget.open == 3


def test_a_key_is_freed_linger_after_its_last_client_and_comes_back_fresh(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop)
    client = setup.client("/jobs/a/progress")
    channel = client.channel
    channel.unsubscribe(client.sub)
    setup.turn()
    assert setup.family.live(setup.key("/jobs/a/progress")) is None
    assert setup.family.closed[CloseReason.LINGER] == 1 and setup.channel_budget.live == 0
    assert channel.closed and not setup.sources["http://127.0.0.1:9/jobs/a/progress?v=1"].running
    again = setup.client("/jobs/a/progress")
    assert again.channel is not channel and setup.family.opened == 2


def test_a_client_back_within_linger_keeps_the_channel_and_its_ring(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop, linger=3600.0)
    first = setup.client("/jobs/a/progress")
    first.channel.publish([Event("one", id="1"), Event("two", id="2")])
    first.channel.unsubscribe(first.sub)
    setup.turn()
    back = Client(first.channel)
    channel = setup.family.open(setup.key("/jobs/a/progress"))
    assert channel is first.channel
    channel.subscribe(back.sub, "1")
    assert [e.id for e in back.decoded().events] == ["2"]


def test_route_max_channels_refuses_a_new_key_unless_a_channel_lingers(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop, max_channels=100, linger=3600.0)
    setup.family = setup.make(linger=3600.0, max_channels=2)
    a = setup.client("/jobs/a/progress")
    setup.client("/jobs/b/progress")
    assert not setup.family.has_room()  # both have clients: never evicted
    a.channel.unsubscribe(a.sub)  # a lingers now
    assert setup.family.has_room()
    assert setup.family.closed[CloseReason.LIMIT] == 1
    assert setup.family.live(setup.key("/jobs/a/progress")) is None
    assert setup.family.live(setup.key("/jobs/b/progress")) is not None


def test_the_process_max_channels_spans_routes_and_frees_another_routes_lingerer(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop, max_channels=2, linger=3600.0)
    rooms = setup.make(
        path="/rooms/{room}",
        upstream=UpstreamConfig(url="http://127.0.0.1:9/rooms/{room}"),
        linger=3600.0,
    )
    job = setup.client("/jobs/a/progress")
    setup.client("/rooms/r1", rooms)
    assert not rooms.has_room() and not setup.family.has_room()
    job.channel.unsubscribe(job.sub)
    assert rooms.has_room()  # the jobs route's lingering channel made room
    assert setup.family.closed[CloseReason.LIMIT] == 1 and setup.channel_budget.live == 1


def test_the_apps_404_for_a_key_is_remembered_then_forgotten(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop)
    client = setup.client("/jobs/nope/progress")
    key = setup.key("/jobs/nope/progress")
    client.channel.upstream_stopped(404)
    assert client.reasons == [DisconnectReason.UPSTREAM_STOPPED]
    assert setup.family.gone(key) == 404 and setup.family.live(key) is None
    assert setup.family.closed[CloseReason.UPSTREAM_GONE] == 1
    assert setup.family.gone(setup.key("/jobs/other/progress")) is None
    setup.clock.now += KEY_GONE_SECONDS
    assert setup.family.gone(key) is None


def test_route_max_clients_spans_its_keys(loop: asyncio.AbstractEventLoop) -> None:
    setup = Setup(loop)
    setup.family = setup.make(max_clients=2)
    setup.client("/jobs/a/progress")
    b = setup.client("/jobs/b/progress")
    assert not setup.family.admits() and not b.channel.admits()
    setup.family.refused(RefusalReason.MAX_CLIENTS)
    assert setup.family.stats.refusals[RefusalReason.MAX_CLIENTS] == 1
    b.channel.unsubscribe(b.sub)
    assert setup.family.admits()


def test_reload_keeps_keys_whose_upstream_is_unchanged(loop: asyncio.AbstractEventLoop) -> None:
    setup = Setup(loop, linger=3600.0)
    setup.family = setup.make(linger=3600.0)
    client = setup.client("/jobs/a/progress")
    closed = setup.family.reconfigure(template_route(linger=3600.0, buffer=10))
    assert closed == [] and setup.family.live(setup.key("/jobs/a/progress")) is client.channel
    assert client.channel.route.buffer == 10 and not client.reasons
    moved = template_route(
        linger=3600.0, upstream=UpstreamConfig(url="http://127.0.0.1:9/v2/{job}")
    )
    assert setup.family.reconfigure(moved) == [client.channel]
    assert client.reasons == [DisconnectReason.DRAIN]
    assert setup.family.closed[CloseReason.RELOAD] == 1


def test_rings_share_the_process_budget_and_give_bytes_back_when_freed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    budget = RingBudget(limit=1 << 20)
    setup = Setup(loop, ring_budget=budget)
    client = setup.client("/jobs/a/progress")
    client.channel.publish([Event("x" * 100, id="1")])
    assert budget.held == client.channel.ring.held_bytes > 100
    client.channel.unsubscribe(client.sub)
    setup.turn()
    assert budget.held == 0 and not budget.rings


def test_a_refused_key_matches_nothing_but_the_path_is_still_claimed(
    loop: asyncio.AbstractEventLoop,
) -> None:
    family = Setup(loop).family
    assert family.match("/jobs/../progress", "") is None
    assert family.claims("/jobs/a/b/progress") and not family.claims("/jobs/a/log")
    assert family.path_of(family.match("/jobs/a_1/progress", "") or ()) == "/jobs/a_1/progress"


def test_a_reload_narrowing_the_key_pattern_during_forward_auth_makes_no_channel(
    loop: asyncio.AbstractEventLoop,
) -> None:
    setup = Setup(loop, key=KeyConfig(pattern="[a-z0-9]{1,12}"))
    family = setup.family
    key = setup.key("/jobs/admin/progress")
    assert family.still_matches(key)
    # While forward-auth decides, SIGHUP narrows the pattern to digits.
    family.reconfigure(template_route(key=KeyConfig(pattern="[0-9]{1,12}")))
    assert not family.still_matches(key)
    assert family.still_matches(setup.key("/jobs/42/progress"))
