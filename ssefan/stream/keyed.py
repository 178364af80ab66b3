"""The channels of a template route: one per live key, made and freed on demand.

A template route (`/jobs/{job}/progress`) has no channel of its own. The first
client of a key makes one (its ring, its heartbeat, its upstream subscription
to the key's URL); `linger` after its last client leaves, the subscription is
closed and the channel, ring included, is freed. A client back within linger
resumes from the ring as on any route.

Bounds, so that no client can exhaust memory or the app:
- `max_channels` per route and across the process (ChannelBudget): a new key
  past either is refused for now (the route's temporary refusal); live
  channels are never evicted to make room.
- The app's "no such key" (404, 410) or "stop" (204) for a key is kept for
  KEY_GONE_SECONDS: the key's streams end, and new clients of it get that
  status from ssefan without the app being asked again. A client hammering
  an unknown job cannot make ssefan hammer the app.
- Per-route counters are sums over keys: every channel of the route bumps one
  shared ChannelStats, so a freed key's counts stay in the route's totals
  and metrics never carry a key (cardinality).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

from ssefan.config import RouteConfig, UpstreamConfig
from ssefan.core.refusal import RefusalReason
from ssefan.core.ring import RingBudget
from ssefan.core.template import (
    ChannelKey,
    RouteTemplate,
    UpstreamTemplate,
    parse_route,
    parse_upstream,
)
from ssefan.stream.channel import Channel, ChannelStats, DisconnectReason, Source, StreamBudget
from ssefan.stream.upstream import UpstreamCounts

__all__ = ["KEY_GONE_SECONDS", "ChannelBudget", "CloseReason", "KeyedChannels"]

log = logging.getLogger("ssefan.channel")

# How long the app's 404/410/204 for a key is answered from memory. Longer
# than a browser's reconnect (retry: 3 s by default) so that the client the
# stream ended for hears the status on its retry, short enough that a job
# created just after the first ask is found soon.
KEY_GONE_SECONDS = 10.0
# Statuses from a key's upstream that end the key rather than being retried.
KEY_GONE_STATUSES = frozenset({204, 404, 410})


class CloseReason(enum.StrEnum):
    """Why a key's channel was freed (ssefan_channels_closed_total{reason})."""

    LINGER = "linger"  # its last client left linger ago
    UPSTREAM_GONE = "upstream_gone"  # the app answered 404, 410 or 204 for the key
    RELOAD = "reload"  # a reload removed the route or changed the key's upstream
    # A lingering channel (no clients, kept for a quick return) freed early
    # because max_channels was reached and a new key's client was waiting.
    LIMIT = "limit"


class ChannelBudget:
    """Live template channels across the process, against `max_channels`."""

    __slots__ = ("families", "limit", "live")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # a reload may change it; live channels stay
        self.live = 0
        self.families: list[KeyedChannels] = []  # where to look for a lingering channel

    @property
    def full(self) -> bool:
        return self.live >= self.limit


# Makes the upstream subscription of one key: (its channel, the upstream
# settings with the key filled in, the label logs name it by, the counters
# the route's keys share).
SourceFactory = Callable[[Channel, UpstreamConfig, str, UpstreamCounts], Source]


class KeyedChannels:
    """The live channels of one template route, by key."""

    def __init__(
        self,
        route: RouteConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        budget: StreamBudget,
        channel_budget: ChannelBudget,
        ring_budget: RingBudget | None,
        make_source: SourceFactory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop = loop
        self.budget = budget
        self.channel_budget = channel_budget
        self.ring_budget = ring_budget
        self.make_source = make_source
        self.clock = clock
        self.channels: dict[ChannelKey, Channel] = {}
        # Shared by every key's channel: the route's counters are their sums.
        self.stats = ChannelStats()
        # max_clients of the route, across its keys.
        self.route_streams = StreamBudget(route.max_clients or 2**62)
        # Shared by every key's upstream, so the route's totals outlive a key.
        self.upstream_counts = UpstreamCounts()
        self.opened = 0
        self.closed: dict[CloseReason, int] = dict.fromkeys(CloseReason, 0)
        self._gone: dict[ChannelKey, tuple[int, float]] = {}  # key -> (status, until)
        # Channels without clients, kept for `linger`, oldest first: what
        # make_room may free early when max_channels is reached.
        self._lingering: dict[ChannelKey, Channel] = {}
        self.route = route
        self.template, self.upstream_template = _parse(route)
        channel_budget.families.append(self)
        # The owner's hooks (state_dir): a key's channel was made, or freed.
        self.on_open: Callable[[Channel, ChannelKey], None] | None = None
        self.on_free: Callable[[Channel], None] | None = None

    # -- matching -------------------------------------------------------------

    def match(self, path: str, query: str) -> ChannelKey | None:
        """The key of a request (path in routing form), or None."""
        keys = self.template.match(path, query)
        return None if keys is None else self.template.channel_key(keys)

    def still_matches(self, key: ChannelKey) -> bool:
        """Whether the route's current template (a reload may have narrowed its
        key pattern) would still give this key."""
        return self.template.match(*self._request_of(key)) is not None

    def claims(self, path: str) -> bool:
        """The path is this template's, even if its key was refused (404 then)."""
        return self.template.claims(path)

    def claims_variant(self, variant: str) -> bool:
        """Like claims, for a path's variant form (protect_variants)."""
        return self.template.claims(variant, fold=True)

    def path_of(self, key: ChannelKey) -> str:
        """The concrete path of a key (its path part): what forward-auth is asked about."""
        return self.template.display(dict(key)).partition("?")[0]

    def display(self, key: ChannelKey) -> str:
        """The key's concrete path (and query), keys encoded: one string per key."""
        return self.template.display(dict(key))

    def label(self, key: ChannelKey) -> str:
        """How logs name a key's channel: the template and the key."""
        return f"{self.route.path} key={','.join(value for _, value in key)}"

    # -- admission --------------------------------------------------------------

    def live(self, key: ChannelKey) -> Channel | None:
        return self.channels.get(key)

    def gone(self, key: ChannelKey) -> int | None:
        """The status the app last gave for the key (404, 410, 204), while it holds."""
        entry = self._gone.get(key)
        if entry is None:
            return None
        status, until = entry
        if self.clock() >= until:
            del self._gone[key]
            return None
        return status

    def has_room(self) -> bool:
        """Whether a new key's channel fits this route's and the process's
        max_channels, once lingering channels (no clients) are freed if need be.
        Channels with clients are never evicted to make room."""
        cap = self.route.max_channels
        if cap is not None and len(self.channels) >= cap and not self._free_lingering():
            return False
        if not self.channel_budget.full:
            return True
        if self._free_lingering():
            return True
        return any(f._free_lingering() for f in self.channel_budget.families if f is not self)

    def _free_lingering(self) -> bool:
        if not self._lingering:
            return False
        key, channel = next(iter(self._lingering.items()))
        self._free(key, channel, CloseReason.LIMIT)
        return True

    def admits(self) -> bool:
        """Whether a new stream fits the route's max_clients (across its keys)
        and the process's."""
        return not self.route_streams.full and not self.budget.full

    def refused(self, reason: RefusalReason) -> None:
        self.stats.refused(reason)

    def open(self, key: ChannelKey) -> Channel:
        """The key's channel, made now if it has none (the caller checked has_room)."""
        channel = self.channels.get(key)
        if channel is not None:
            return channel
        label = self.label(key)
        upstream = self._upstream_of(key)
        channel = Channel(
            self.route,
            loop=self.loop,
            clock=self.clock,
            budget=self.budget,
            stats=self.stats,
            route_streams=self.route_streams,
            ring_budget=self.ring_budget,
            label=label,
        )
        channel.on_idle = lambda: self._free(key, channel, CloseReason.LINGER)
        channel.on_vacancy = lambda vacant: self._vacancy(key, channel, vacant)
        channel.on_stopped = lambda status: self._stopped(key, channel, status)
        channel.attach_source(self.make_source(channel, upstream, label, self.upstream_counts))
        if self.on_open is not None:
            self.on_open(channel, key)  # restores the key's ring, if it was kept
        self.channels[key] = channel
        self.channel_budget.live += 1
        self.opened += 1
        channel.start()
        return channel

    def _upstream_of(self, key: ChannelKey) -> UpstreamConfig:
        return _render(self.route.upstream, self.upstream_template, key)

    def _vacancy(self, key: ChannelKey, channel: Channel, vacant: bool) -> None:
        """The channel's last client left (vacant) or a first one came back."""
        if vacant and self.channels.get(key) is channel:
            self._lingering[key] = channel
        else:
            self._lingering.pop(key, None)

    # -- lifecycle --------------------------------------------------------------

    def _stopped(self, key: ChannelKey, channel: Channel, status: int) -> None:
        """The app answered `status` for the key: remember it, free the channel."""
        self._gone[key] = (status, self.clock() + KEY_GONE_SECONDS)
        if len(self._gone) > 4 * max(self.channel_budget.limit, 1):
            self._forget_expired()
        log.info(
            "route=%s the app answered %d: the key's streams end and new clients get %d"
            " for %.0fs without asking the app",
            channel.label,
            status,
            status,
            KEY_GONE_SECONDS,
        )
        # Its streams ended already (Channel.upstream_stopped).
        self._free(key, channel, CloseReason.UPSTREAM_GONE, DisconnectReason.UPSTREAM_STOPPED)

    def _forget_expired(self) -> None:
        now = self.clock()
        for key in [k for k, (_, until) in self._gone.items() if until <= now]:
            del self._gone[key]

    def _free(
        self,
        key: ChannelKey,
        channel: Channel,
        reason: CloseReason | None,
        ending: DisconnectReason = DisconnectReason.DRAIN,
    ) -> None:
        if self.channels.get(key) is not channel:
            return  # freed already
        del self.channels[key]
        self._lingering.pop(key, None)
        self.channel_budget.live -= 1
        if reason is not None:
            self.closed[reason] += 1
        channel.close(ending)
        if self.on_free is not None:
            self.on_free(channel)

    def close(
        self,
        reason: DisconnectReason = DisconnectReason.DRAIN,
        counted: CloseReason | None = None,
    ) -> None:
        """Shutdown (uncounted), or the route was removed (RELOAD): end every
        key's streams and leave the process's channel budget."""
        for key, channel in list(self.channels.items()):
            self._free(key, channel, counted, reason)
        if self in self.channel_budget.families:
            self.channel_budget.families.remove(self)

    def reconfigure(self, route: RouteConfig) -> list[Channel]:
        """Apply a reloaded template route; returns the channels it had to close.

        Keys whose upstream URL and headers stay the same keep their channel,
        ring and clients (reconfigured in place, like a static route); the
        others are closed, and their clients reconnect into the new settings.
        """
        old, old_upstream = self.route, self.upstream_template
        self.route = route
        self.template, self.upstream_template = _parse(route)
        self.route_streams.limit = route.max_clients or 2**62
        closed: list[Channel] = []
        for key, channel in list(self.channels.items()):
            if self.template.match(*self._request_of(key)) is None or (
                self._upstream_of(key) != _render(old.upstream, old_upstream, key)
            ):
                closed.append(channel)
                self._free(key, channel, CloseReason.RELOAD, DisconnectReason.DRAIN)
            else:
                channel.reconfigure(route)
        return closed

    def _request_of(self, key: ChannelKey) -> tuple[str, str]:
        path, _, query = self.template.display(dict(key)).partition("?")
        return path, query

    # -- introspection ----------------------------------------------------------

    def __iter__(self) -> Iterator[Channel]:
        return iter(self.channels.values())

    @property
    def client_count(self) -> int:
        return self.route_streams.open

    def busiest(self, n: int = 10) -> list[tuple[str, int]]:
        """The n keys with most clients: (concrete path, clients), for the status page."""
        ranked = sorted(self.channels.items(), key=lambda item: -item[1].client_count)
        return [(self.template.display(dict(key)), ch.client_count) for key, ch in ranked[:n]]


def _parse(route: RouteConfig) -> tuple[RouteTemplate, UpstreamTemplate]:
    upstream = route.upstream
    return (
        parse_route(route.path, pattern=route.key.pattern),
        parse_upstream(upstream.url, upstream.headers),
    )


def _render(
    upstream: UpstreamConfig, template: UpstreamTemplate, key: ChannelKey
) -> UpstreamConfig:
    keys = dict(key)
    return replace(upstream, url=template.render_url(keys), headers=template.render_headers(keys))
