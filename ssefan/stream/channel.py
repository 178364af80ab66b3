"""One route's fan-out, the asyncio shell: transports, timers, the write loop.

The hot path (DESIGN.md): an upstream read becomes a batch of events, each is
encoded once and appended to the ring (core.fanout.Intake), the batch is
joined once and framed once (core.framing), and the same bytes object is
written to every live subscriber. A live subscriber's position is implicitly
the ring head, so fan-out touches nothing per client but `transport.write`.

Who is live, lagging or waiting, where a new client starts, catch-up from the
ring and when a client is cut off are core.cursors' rules, without I/O. This
module gives them what they act on: subscribers (stream.subscriber: a
transport each, its flow-control marks, a reset when cut off), the timers
(heartbeat, linger, the upstream's backlog), the source's start and stop, the
one place a stream ends (stream accounting, logs) and the counters.

It stays one module of some 540 lines because what is left is the state of
one object: its timers, its source's running flag, the ring it shares with
the intake and the cursors, and the counters. Most methods move several of
these at once (a reload touches the ring, the timers, the source and the
clients; a stream's end touches the cursors, the budget, the linger timer
and the source), so parts split off by method would each reach into the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from ssefan.config import RouteConfig
from ssefan.core.cursors import GAP_EVENT, Backlog, Cursors, DisconnectReason
from ssefan.core.fanout import Intake
from ssefan.core.framing import TERMINAL_CHUNK, chunk
from ssefan.core.refusal import RefusalReason
from ssefan.core.ring import Ring, RingBudget
from ssefan.core.sse import (
    Event,
    IdOnly,
    Overflow,
    encode,
    encode_comment,
    encode_retry,
    resumable_id,
)
from ssefan.stream.subscriber import CATCH_UP_SLICE_BYTES, Subscriber

__all__ = [
    "GAP_EVENT",  # core.cursors', named here too for the channel's users
    "Channel",
    "ChannelStats",
    "DisconnectReason",  # likewise
    "Source",
    "StreamBudget",
    "Subscriber",  # stream.subscriber's, likewise
]

log = logging.getLogger("ssefan.channel")


class Source(Protocol):
    """Where a channel's events come from (an upstream SSE stream today)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Recording(Protocol):
    """What keeps a channel's ring across restarts (stream.persistence)."""

    def record(self, start_seq: int) -> None:
        """The ring took seqs [start_seq, next_seq); the last upstream id may have moved."""


class StreamBudget:
    """Streams open at once across one process's channels, against `max_clients`.

    Shared by every channel; each channel counts its own streams in and out
    (Channel.subscribe and the one place a stream ends), so there is one owner
    of stream accounting and no count to keep in step elsewhere.
    """

    __slots__ = ("limit", "open")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # a reload may change it; streams already open stay
        self.open = 0

    @property
    def full(self) -> bool:
        return self.open >= self.limit


class ChannelStats:
    """Plain counters, bumped where the work happens and rendered on scrape."""

    __slots__ = (
        "bytes_out",
        "connects",
        "disconnects",
        "duplicates_dropped",
        "events_delivered",
        "events_received",
        "heartbeats",
        "ids_reused",
        "overflows",
        "refusals",
        "replay_gaps",
        "replay_hits",
        "replay_misses",
    )

    def __init__(self) -> None:
        self.connects = 0
        self.disconnects: dict[DisconnectReason, int] = dict.fromkeys(DisconnectReason, 0)
        # Streams refused for a temporary reason (the client was told to retry).
        self.refusals: dict[RefusalReason, int] = dict.fromkeys(RefusalReason, 0)
        self.events_received = 0
        self.events_delivered = 0
        self.bytes_out = 0
        self.duplicates_dropped = 0  # upstream replays of events already sent
        # Upstream events whose id was already used by a different event: sent
        # on with an id ssefan assigns, so every id names one event.
        self.ids_reused = 0
        self.overflows = 0
        self.heartbeats = 0
        self.replay_hits = 0  # resumed exactly from a held id
        self.replay_misses = 0  # id unknown to the ring
        self.replay_gaps = 0  # id was held once but has been evicted

    def refused(self, reason: RefusalReason) -> None:
        """Count a stream refused at the door (the client was told to retry)."""
        self.refusals[reason] += 1
        if reason is RefusalReason.MAX_CLIENTS:
            # Counted with the stream endings too, as "limit".
            self.disconnects[DisconnectReason.LIMIT] += 1


class Channel:
    """The shared state of one route, or of one key of a template route.

    A template's key channels (stream.keyed) share the route's `stats` and
    `route_streams` (so per-route counters and max_clients span its keys),
    are named in logs by `label`, and tell their owner when their last client
    leaves or returns (`on_vacancy`), when linger has passed with none
    (`on_idle`) and when the app stopped the key (`on_stopped`).
    """

    def __init__(
        self,
        route: RouteConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.monotonic,
        budget: StreamBudget | None = None,
        stats: ChannelStats | None = None,
        route_streams: StreamBudget | None = None,
        ring_budget: RingBudget | None = None,
        label: str | None = None,
    ) -> None:
        self.route = route
        self.label = label if label is not None else route.path  # what logs call it
        # Without a budget (tests, benchmarks): only the route's own cap applies.
        self.budget = budget if budget is not None else StreamBudget(limit=2**62)
        # The route's max_clients; a template's keys share the route's.
        self._owns_route_streams = route_streams is None
        self.route_streams = (
            route_streams if route_streams is not None else StreamBudget(_route_cap(route))
        )
        self.loop = loop
        self.clock = clock
        self.ring = Ring(
            max_events=route.buffer,
            max_bytes=route.buffer_bytes,
            max_age=route.buffer_age,
            budget=ring_budget,
        )
        self.stats = stats if stats is not None else ChannelStats()
        self.on_vacancy: Callable[[bool], None] | None = None
        self.on_idle: Callable[[], None] | None = None
        self.on_stopped: Callable[[int], None] | None = None
        # With state_dir: journals what the ring takes (stream.persistence).
        self.recorder: Recording | None = None
        self.source: Source | None = None
        # True after the app answered 204: streams end and new clients get 204.
        self.stopped_by_upstream = False
        # True once close() ran (shutdown, or the route was removed by a reload).
        self.closed = False
        self.last_event_at = clock()
        self.cursors: Cursors[Subscriber] = Cursors(
            self.ring,
            max_lag_bytes=route.max_client_lag_bytes,
            slice_bytes=CATCH_UP_SLICE_BYTES,
            tally=self.stats,
            cut=self._cut,
        )
        # The cursors' live sets (split by framing so the fan-out loop does no
        # branching) and lagging set: the same objects, held here so that the
        # fan-out reads them without another attribute lookup.
        self._live_chunked = self.cursors.live_chunked
        self._live_raw = self.cursors.live_raw
        self._lagging = self.cursors.lagging
        # Whether the upstream streams; while its backlog since a resumed id
        # is still arriving, `_catch_up_handle` is armed (core.cursors.Backlog).
        self._streaming = False
        self._backlog = Backlog()
        self._catch_up_handle: asyncio.TimerHandle | None = None
        self._warned_reuse = False
        self._heartbeat_handle: asyncio.TimerHandle | None = None
        self._linger_handle: asyncio.TimerHandle | None = None
        self._source_running = False
        # Ids ssefan assigns: a per-channel-instance prefix so ids from an older
        # process or ring never alias ours. Hex + '-' + decimal: CORS-safe, short.
        self.intake = Intake(self.ring, f"{int(time.time() * 1000):x}{os.getpid() % 0xFFFF:04x}-")
        self._heartbeat_bytes = self._make_heartbeat()

    # -- lifecycle ------------------------------------------------------------

    def attach_source(self, source: Source) -> None:
        self.source = source

    def start(self) -> None:
        self._schedule_heartbeat(self.route.heartbeat)
        if self.route.mode == "eager":
            self._start_source()

    def close(self, reason: DisconnectReason = DisconnectReason.DRAIN) -> None:
        """Stop the source and timers, end every stream, give the ring's bytes back."""
        self.closed = True
        self._stop_source()
        self._cancel_catch_up()
        for handle in (self._heartbeat_handle, self._linger_handle):
            if handle is not None:
                handle.cancel()
        self._heartbeat_handle = self._linger_handle = None
        self.end_streams(reason)
        self.ring.release()
        # A closed channel (a freed template key, a removed route) leaves no
        # reference cycle for the collector: under key churn thousands would
        # wait for a full collection, a pause of tens of ms for every client.
        self.source = None
        self.cursors.cut = _no_cut
        self.on_vacancy = self.on_idle = self.on_stopped = None

    def end_streams(self, reason: DisconnectReason) -> None:
        for sub in list(self.subscribers()):
            self.end_stream(sub, reason)

    def end_stream(
        self, sub: Subscriber, reason: DisconnectReason, *, retry: int | None = None
    ) -> None:
        """End one stream cleanly; `retry` (ms) first tells the client how long
        to wait before it reconnects (a drain spreads the reconnects out)."""
        if sub.closed:
            return
        if not sub.paused:
            if retry is not None:
                sub.send(encode_retry(retry))
            if sub.chunked:
                # A terminal chunk lets the client see a clean end of body.
                sub.transport.write(TERMINAL_CHUNK)
        self._drop(sub, reason, abort=sub.paused)

    def reconfigure(self, route: RouteConfig, source: Source | None = None) -> None:
        """Apply a reloaded route in place: the ring and every client stay.

        `source` replaces the subscription (the upstream settings changed); it
        resumes from `upstream_last_id` and its replays are de-duplicated
        against the ring as after any reconnect. Changed ring bounds rebuild
        the ring with the same sequence numbers, so cursors stay valid.
        """
        old = self.route
        if source is not None:
            was_running = self._source_running
            self._stop_source()
            self.source = source
            if was_running:
                self._start_source()
        self.route = route
        if self._owns_route_streams:
            self.route_streams.limit = _route_cap(route)
        self.cursors.max_lag_bytes = route.max_client_lag_bytes
        if (route.buffer, route.buffer_bytes, route.buffer_age) != (
            old.buffer,
            old.buffer_bytes,
            old.buffer_age,
        ):
            self._rebuild_ring()
        self._heartbeat_bytes = self._make_heartbeat()
        if self._heartbeat_handle is not None and route.heartbeat != old.heartbeat:
            self._heartbeat_handle.cancel()
            self._schedule_heartbeat(route.heartbeat)
        if self.stopped_by_upstream:
            # The app's 204 holds "until a reload or restart": this is the reload.
            self.stopped_by_upstream = False
        if route.mode == "eager" and self._heartbeat_handle is not None:
            self._start_source()
            if self._linger_handle is not None:
                self._linger_handle.cancel()
                self._linger_handle = None
        elif old.mode == "eager" and self.client_count == 0 and self._source_running:
            self._linger_handle = self.loop.call_later(route.linger, self._linger_expired)

    def _rebuild_ring(self) -> None:
        route = self.route
        # Same numbering: a lagging client's cursor means the same event after.
        ring = self.ring.resized(
            max_events=route.buffer, max_bytes=route.buffer_bytes, max_age=route.buffer_age
        )
        self.ring = self.intake.ring = ring
        self.cursors.resized(ring)

    def stop_source(self) -> None:
        """Stop the upstream (the process is stopping): the ring takes nothing
        more, so a final snapshot of it is the last word on every id given."""
        self._stop_source()

    def _start_source(self) -> None:
        if self.source is not None and not self._source_running:
            self._source_running = True
            self.source.start()

    def _stop_source(self) -> None:
        if self.source is not None and self._source_running:
            self._source_running = False
            self.source.stop()
            self.upstream_disconnected()

    # -- introspection --------------------------------------------------------

    @property
    def upstream_last_id(self) -> str:
        """The last id the upstream gave: sent back as Last-Event-ID on reconnect."""
        return self.intake.last_upstream_id

    @upstream_last_id.setter
    def upstream_last_id(self, value: str) -> None:
        self.intake.last_upstream_id = value

    def admits(self) -> bool:
        """Whether a new stream fits: the route's `max_clients` and the process's."""
        return not self.route_streams.full and not self.budget.full

    def refused(self, reason: RefusalReason) -> None:
        """Count a stream refused at the door (the client was told to retry)."""
        self.stats.refused(reason)

    @property
    def client_count(self) -> int:
        return len(self.cursors)

    def subscribers(self) -> Iterable[Subscriber]:
        return iter(self.cursors)

    # -- upstream side --------------------------------------------------------

    def upstream_connected(self) -> None:
        """A new upstream response began: it may replay events we hold.

        Two things follow. Events the ring holds or held, byte for byte, are
        dropped as replays until the first one that is new (see publish). And
        if the request carried a Last-Event-ID, the app may first send the
        backlog since it: new live clients waiting meanwhile join once it has
        passed (core.cursors.Backlog), not at its start.
        """
        self.intake.reconnected()
        self._warned_reuse = False
        self._streaming = True
        self._cancel_catch_up()
        if resumable_id(self.upstream_last_id):
            delay = self._backlog.began(self.clock())
            self._catch_up_handle = self.loop.call_later(delay, self._caught_up)
        else:
            self._caught_up()

    def upstream_disconnected(self) -> None:
        """The upstream connection ended or failed; a reconnect will follow."""
        self._streaming = False
        self._cancel_catch_up()

    def _cancel_catch_up(self) -> None:
        if self._catch_up_handle is not None:
            self._catch_up_handle.cancel()
            self._catch_up_handle = None

    def _caught_up(self) -> None:
        """The upstream is live: waiting new clients start at the ring's head."""
        self._catch_up_handle = None
        self.cursors.backlog_passed()

    def _joins_at_head_now(self) -> bool:
        """Whether a new live client can start at the ring's head right away."""
        if self.source is None:
            return True  # fed directly (tests, benchmarks): always live
        return self._streaming and self._catch_up_handle is None

    def upstream_stopped(self, status: int = 204) -> None:
        """The app answered 204 (or, for a template's key, 404/410): end every
        stream; new clients get that status too (a key's owner keeps it)."""
        self.stopped_by_upstream = True
        self._stop_source()
        self.end_streams(DisconnectReason.UPSTREAM_STOPPED)
        if self.on_stopped is not None:
            self.on_stopped(status)

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None:
        """Append one upstream read's worth of events and fan them out."""
        now = self.clock()
        start = self.ring.next_seq
        accepted = self.intake.accept(items, now)
        if self.recorder is not None:
            self.recorder.record(start)
        for item in accepted.overflows:
            self._count_overflow(item)
        self.stats.duplicates_dropped += accepted.replays
        for upstream_id, event_id in accepted.reused:
            self._reused_id(upstream_id, event_id)
        batch = accepted.events
        if not batch:
            return
        self.stats.events_received += len(batch)
        self.last_event_at = now
        self._fan_out(batch[0] if len(batch) == 1 else b"".join(batch), len(batch))
        if self._lagging:
            self.cursors.cut_laggards()
        handle = self._catch_up_handle
        if handle is not None:
            # Still in the backlog: it has passed once the reads pause.
            handle.cancel()
            self._catch_up_handle = self.loop.call_later(self._backlog.read(now), self._caught_up)

    def _reused_id(self, upstream_id: str, event_id: str) -> None:
        """Count an upstream id that named a second event (delivered as `event_id`)."""
        self.stats.ids_reused += 1
        if not self._warned_reuse:
            self._warned_reuse = True  # once per upstream connection
            log.warning(
                "route=%s upstream reused event id %.64r for a different event: delivered"
                " as id %s. Event ids must be unique across the app's connections and"
                " restarts (a global counter kept across deploys, a timestamp or a UUID),"
                " and the app should honour Last-Event-ID; otherwise clients that resume"
                " cannot get exactly what they missed",
                self.label,
                upstream_id,
                event_id,
            )

    def _count_overflow(self, item: Overflow) -> None:
        self.stats.overflows += 1
        setting = "max_line_bytes" if item.kind == "line" else "max_event_bytes"
        log.warning(
            "route=%s upstream sent an over-long %s (%d bytes, over %s): event dropped; "
            "raise routes[].upstream.%s if such events are legitimate",
            self.label,
            item.kind,
            item.size,
            setting,
            setting,
        )

    def _fan_out(self, payload: bytes, events: int) -> None:
        # The hot loop: same bytes object to everyone, nothing per client but
        # the write. Iterate copies: a write may call pause_writing, which moves
        # that subscriber out of the live set.
        n = 0
        if self._live_chunked:
            framed = chunk(payload)
            writers = list(self._live_chunked.values())
            for write in writers:
                write(framed)
            n += len(writers)
            self.stats.bytes_out += len(framed) * len(writers)
        if self._live_raw:
            writers = list(self._live_raw.values())
            for write in writers:
                write(payload)
            n += len(writers)
            self.stats.bytes_out += len(payload) * len(writers)
        self.stats.events_delivered += events * n

    # -- client side ----------------------------------------------------------

    def subscribe(self, sub: Subscriber, last_event_id: str | None) -> None:
        """Register a client whose response headers are already written.

        Computing the replay start and joining the live set happen in this one
        synchronous call: no event can slip between replay and live. The stream
        counts against the budget from here until `_drop`, which every ending
        goes through.
        """
        self.budget.open += 1
        self.route_streams.open += 1
        if self.closed:
            # The route went away (reload) between the request and now: end
            # the stream at once; the client reconnects to the current config.
            self.end_stream(sub, DisconnectReason.DRAIN)
            return
        self.stats.connects += 1
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if self.on_vacancy is not None and self.client_count == 0:
            self.on_vacancy(False)
        if self.route.mode == "lazy":
            self._start_source()
        now = self.clock()
        self.ring.expire(now)
        route = self.route
        self.cursors.join(
            sub,
            last_event_id,
            start=route.start,
            on_gap=route.on_gap,
            at_head=self._joins_at_head_now(),
            now=now,
        )

    def unsubscribe(self, sub: Subscriber) -> None:
        """The client went away (connection lost)."""
        if not sub.closed:
            self._drop(sub, DisconnectReason.CLIENT_CLOSED, abort=False, close=False)

    def pause(self, sub: Subscriber) -> None:
        """The client's transport buffer passed its high-water mark."""
        self.cursors.pause(sub)

    def resume(self, sub: Subscriber) -> None:
        """The client's transport buffer drained to its low-water mark."""
        self.cursors.resume(sub)

    def _cut(self, sub: Subscriber, reason: DisconnectReason) -> None:
        """Cut a client off (core.cursors' verdict): its connection is reset."""
        self._drop(sub, reason, abort=True)

    def _drop(
        self, sub: Subscriber, reason: DisconnectReason, *, abort: bool, close: bool = True
    ) -> None:
        if sub.closed:
            return
        sub.closed = True
        self.budget.open -= 1
        self.route_streams.open -= 1
        self.cursors.remove(sub)
        self.stats.disconnects[reason] += 1
        if reason in (DisconnectReason.SLOW, DisconnectReason.EVICTED):
            why = (
                f"more than max_client_lag_bytes={self.route.max_client_lag_bytes} behind"
                if reason is DisconnectReason.SLOW
                else f"fell off the ring (buffer={self.route.buffer})"
            )
            # Info, not warning: one slow phone is normal; many show in metrics.
            log.info(
                "route=%s client cut off: %s (%s); it resumes by reconnecting",
                self.label,
                reason,
                why,
            )
        if close:
            if abort:
                sub.reset()
            else:
                sub.transport.close()
        if sub.on_close is not None:
            on_close, sub.on_close = sub.on_close, None  # the connection's: no cycle left
            on_close(reason)
        if self.client_count == 0:
            if self.route.mode == "lazy" and self._source_running:
                self._linger_handle = self.loop.call_later(self.route.linger, self._linger_expired)
            if self.on_vacancy is not None and not self.closed:
                self.on_vacancy(True)

    def _linger_expired(self) -> None:
        self._linger_handle = None
        if self.client_count == 0:
            self._stop_source()
            if self.on_idle is not None:
                self.on_idle()  # a template's key: its owner frees the channel

    # -- heartbeat ------------------------------------------------------------

    def _make_heartbeat(self) -> bytes:
        if self.route.heartbeat_event is None:
            return encode_comment("")
        return b""  # named pings carry the current id: built when sent

    def _schedule_heartbeat(self, delay: float) -> None:
        self._heartbeat_handle = self.loop.call_later(delay, self._heartbeat)

    def _heartbeat(self) -> None:
        interval = self.route.heartbeat
        now = self.clock()
        self.ring.expire(now)
        idle_for = now - self.last_event_at
        if idle_for < interval:
            self._schedule_heartbeat(interval - idle_for)
            return
        payload = self._heartbeat_bytes
        if not payload:
            assert self.route.heartbeat_event is not None
            # A ping event must not reset the client's last event id: live
            # clients hold everything up to the head, so repeat the newest id.
            payload = encode(Event("", event=self.route.heartbeat_event, id=self.ring.newest_id))
        self.stats.heartbeats += 1
        self._fan_out(payload, 0)
        waiting = self.cursors.waiting
        if waiting:  # waiting clients' proxies must not time out either
            comment = encode_comment("")
            for sub in waiting:
                if not sub.paused:
                    sub.send(comment)
        self.last_event_at = now
        self._schedule_heartbeat(interval)


def _route_cap(route: RouteConfig) -> int:
    return route.max_clients if route.max_clients is not None else 2**62


def _no_cut(sub: Subscriber, reason: DisconnectReason) -> None:
    """What a closed channel's cursors cut with: nothing is left to cut."""
