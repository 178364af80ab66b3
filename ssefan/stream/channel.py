"""One route's fan-out: ring, subscribers, heartbeat and the slow-consumer policy.

The hot path (DESIGN.md): an upstream read becomes a batch of events, each is
encoded once and appended to the ring, the batch is joined once and framed
once, and the same bytes object is written to every live subscriber. A live
subscriber's position is implicitly the ring head, so fan-out touches nothing
per client but `transport.write`.

A subscriber whose transport pushes back (`pause_writing`) leaves the live set
and keeps only a cursor into the ring; on `resume_writing` it catches up from
the ring in bounded slices and rejoins the live set when it reaches the head.
If it falls off the ring's tail or too far behind, it is cut off and resumes by
reconnecting with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from ssefan.config import RouteConfig
from ssefan.core.fanout import Intake
from ssefan.core.refusal import RefusalReason
from ssefan.core.ring import Ring
from ssefan.core.sse import (
    Event,
    IdOnly,
    Overflow,
    encode,
    encode_comment,
    encode_retry,
    resumable_id,
)

__all__ = [
    "GAP_EVENT",
    "Channel",
    "ChannelStats",
    "DisconnectReason",
    "Source",
    "Subscriber",
]

log = logging.getLogger("ssefan.channel")

# The named event a client receives when its Last-Event-ID can't be resumed
# exactly (unknown or already evicted). Browsers see events, not headers.
GAP_EVENT = "ssefan-gap"

# Per-client transport buffer before `pause_writing`. 64 KiB is asyncio's own
# default; with 10 000 clients that still bounds user-space buffers to ~640 MiB
# in the worst case where every client stops reading at once.
WRITE_HIGH_WATER = 64 * 1024
WRITE_LOW_WATER = 16 * 1024
# A catch-up write (replay or recovery after backpressure) carries at most one
# high-water mark's worth; the mark then decides whether to go on at once. So
# what one client has buffered stays within about twice the mark.
CATCH_UP_SLICE_BYTES = WRITE_HIGH_WATER

_TERMINAL_CHUNK = b"0\r\n\r\n"

# After an upstream (re)connect that sent a Last-Event-ID, the app may first
# send the backlog since that id: events published before a new client came.
# A client without a resume position (`start: live`) that connects while the
# upstream is down or catching up waits until the backlog has passed, so it
# starts at the first event after it (see Channel.upstream_connected). The
# backlog counts as passed once the upstream has been quiet this long after a
# read (a backlog arrives in back-to-back reads)...
CATCH_UP_QUIET = 0.05
# ...or this long after the response began with no read at all (an app that
# had nothing to replay, or takes a moment to start)...
CATCH_UP_FIRST_READ = 0.25
# ...and at the latest this long after the response began (an app that
# streams fast enough never goes quiet).
CATCH_UP_MAX = 1.0


class DisconnectReason(enum.StrEnum):
    CLIENT_CLOSED = "client_closed"
    SLOW = "slow"  # unsent data passed max_client_lag_bytes
    EVICTED = "evicted"  # its cursor fell off the ring's tail
    UPSTREAM_STOPPED = "upstream_stopped"  # the app answered 204
    DRAIN = "drain"  # shutdown or route removed
    REVOKED = "revoked"  # forward-auth no longer admits its credential
    LIMIT = "limit"  # refused at connect: the route's or the global max_clients
    ERROR = "error"


class Source(Protocol):
    """Where a channel's events come from (an upstream SSE stream today)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


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


class Subscriber:
    """A client stream: a transport plus a cursor into the ring."""

    __slots__ = ("chunked", "closed", "cursor", "on_close", "paused", "transport")

    def __init__(
        self,
        transport: asyncio.WriteTransport,
        *,
        chunked: bool,
        on_close: Callable[[DisconnectReason], None] | None = None,
    ) -> None:
        self.transport = transport
        self.chunked = chunked  # HTTP/1.1 chunked framing, else close-delimited
        self.cursor = 0  # seq of the next event it needs (meaningful when not live)
        self.paused = False
        self.closed = False
        self.on_close = on_close
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def send(self, payload: bytes) -> None:
        """Write bytes framed for this client (not the shared fan-out path)."""
        if self.chunked:
            payload = b"%x\r\n%b\r\n" % (len(payload), payload)
        self.transport.write(payload)


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    # abort() drops our buffer, but the kernel would still try to deliver what
    # its send buffer holds (MiBs for a stuck socket on Linux) before closing.
    # SO_LINGER with a zero timeout makes close() send RST and free it now.
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Channel:
    """The shared state of one route."""

    def __init__(
        self,
        route: RouteConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        clock: Callable[[], float] = time.monotonic,
        budget: StreamBudget | None = None,
    ) -> None:
        self.route = route
        # Without a budget (tests, benchmarks): only the route's own cap applies.
        self.budget = budget if budget is not None else StreamBudget(limit=2**62)
        self.loop = loop
        self.clock = clock
        self.ring = Ring(
            max_events=route.buffer, max_bytes=route.buffer_bytes, max_age=route.buffer_age
        )
        self.stats = ChannelStats()
        self.source: Source | None = None
        # True after the app answered 204: streams end and new clients get 204.
        self.stopped_by_upstream = False
        # True once close() ran (shutdown, or the route was removed by a reload).
        self.closed = False
        self.last_event_at = clock()
        # Live subscribers, split by framing so the fan-out loop does no branching.
        self._live_chunked: dict[Subscriber, Callable[[bytes], object]] = {}
        self._live_raw: dict[Subscriber, Callable[[bytes], object]] = {}
        self._lagging: set[Subscriber] = set()
        # New `start: live` clients waiting for the upstream to stream and be
        # past its catch-up backlog; they hold no cursor yet.
        self._pending: set[Subscriber] = set()
        self._streaming = False
        self._catch_up_handle: asyncio.TimerHandle | None = None
        self._catch_up_deadline = 0.0
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
        """Stop the source and timers and end every stream."""
        self.closed = True
        self._stop_source()
        self._cancel_catch_up()
        for handle in (self._heartbeat_handle, self._linger_handle):
            if handle is not None:
                handle.cancel()
        self._heartbeat_handle = self._linger_handle = None
        self.end_streams(reason)

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
                sub.transport.write(_TERMINAL_CHUNK)
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
        old, route = self.ring, self.route
        ring = Ring(max_events=route.buffer, max_bytes=route.buffer_bytes, max_age=route.buffer_age)
        ring.remember_evicted_of(old)
        # Same numbering: a lagging client's cursor means the same event after.
        ring.first_seq = ring.next_seq = old.first_seq
        for seq in range(old.first_seq, old.next_seq):
            ring.append(old.id_at(seq), old.join(seq, seq + 1), old.time_at(seq))
        self.ring = self.intake.ring = ring
        if self._lagging:
            self._police_laggards()  # a smaller ring may have dropped their place

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
        cap = self.route.max_clients
        if cap is not None and self.client_count >= cap:
            return False
        return not self.budget.full

    def refused(self, reason: RefusalReason) -> None:
        """Count a stream refused at the door (the client was told to retry)."""
        self.stats.refusals[reason] += 1
        if reason is RefusalReason.MAX_CLIENTS:
            # Counted with the stream endings too, as "limit".
            self.stats.disconnects[DisconnectReason.LIMIT] += 1

    @property
    def client_count(self) -> int:
        return (
            len(self._live_chunked) + len(self._live_raw) + len(self._lagging) + len(self._pending)
        )

    def subscribers(self) -> Iterable[Subscriber]:
        yield from self._live_chunked
        yield from self._live_raw
        yield from self._lagging
        yield from self._pending

    # -- upstream side --------------------------------------------------------

    def upstream_connected(self) -> None:
        """A new upstream response began: it may replay events we hold.

        Two things follow. Events the ring holds or held, byte for byte, are
        dropped as replays until the first one that is new (see publish). And
        if the request carried a Last-Event-ID, the app may first send the
        backlog since it: new live clients waiting meanwhile join once it has
        passed (CATCH_UP_*), not at its start.
        """
        self.intake.reconnected()
        self._warned_reuse = False
        self._streaming = True
        self._cancel_catch_up()
        if resumable_id(self.upstream_last_id):
            self._catch_up_deadline = self.clock() + CATCH_UP_MAX
            self._catch_up_handle = self.loop.call_later(CATCH_UP_FIRST_READ, self._caught_up)
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
        pending, self._pending = self._pending, set()
        head = self.ring.next_seq
        for sub in pending:
            sub.cursor = head
            self._lagging.add(sub)
            self._catch_up(sub)

    def _joins_at_head_now(self) -> bool:
        """Whether a new live client can start at the ring's head right away."""
        if self.source is None:
            return True  # fed directly (tests, benchmarks): always live
        return self._streaming and self._catch_up_handle is None

    def upstream_stopped(self) -> None:
        """The app answered 204: end every stream; new clients get 204 too."""
        self.stopped_by_upstream = True
        self._stop_source()
        self.end_streams(DisconnectReason.UPSTREAM_STOPPED)

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None:
        """Append one upstream read's worth of events and fan them out."""
        now = self.clock()
        accepted = self.intake.accept(items, now)
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
            self._police_laggards()
        handle = self._catch_up_handle
        if handle is not None:
            # Still in the backlog: it has passed once the reads pause.
            handle.cancel()
            delay = min(CATCH_UP_QUIET, max(0.0, self._catch_up_deadline - now))
            self._catch_up_handle = self.loop.call_later(delay, self._caught_up)

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
                self.route.path,
                upstream_id,
                event_id,
            )

    def _count_overflow(self, item: Overflow) -> None:
        self.stats.overflows += 1
        setting = "max_line_bytes" if item.kind == "line" else "max_event_bytes"
        log.warning(
            "route=%s upstream sent an over-long %s (%d bytes, over %s): event dropped; "
            "raise routes[].upstream.%s if such events are legitimate",
            self.route.path,
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
            framed = b"%x\r\n%b\r\n" % (len(payload), payload)
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

    def _police_laggards(self) -> None:
        ring, limit = self.ring, self.route.max_client_lag_bytes
        for sub in list(self._lagging):
            if sub.cursor < ring.first_seq:
                self._drop(sub, DisconnectReason.EVICTED, abort=True)
            elif ring.bytes_from(sub.cursor) + sub.transport.get_write_buffer_size() > limit:
                self._drop(sub, DisconnectReason.SLOW, abort=True)

    # -- client side ----------------------------------------------------------

    def subscribe(self, sub: Subscriber, last_event_id: str | None) -> None:
        """Register a client whose response headers are already written.

        Computing the replay start and joining the live set happen in this one
        synchronous call: no event can slip between replay and live. The stream
        counts against the budget from here until `_drop`, which every ending
        goes through.
        """
        self.budget.open += 1
        if self.closed:
            # The route went away (reload) between the request and now: end
            # the stream at once; the client reconnects to the current config.
            self.end_stream(sub, DisconnectReason.DRAIN)
            return
        self.stats.connects += 1
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        if self.route.mode == "lazy":
            self._start_source()
        ring = self.ring
        ring.expire(self.clock())
        if not last_event_id and self.route.start.kind == "live" and not self._joins_at_head_now():
            # No events yet that are surely after this connect: wait for them.
            self._pending.add(sub)
            return
        if last_event_id:
            seq = ring.seq_of(last_event_id)
            if seq is not None:
                self.stats.replay_hits += 1
                sub.cursor = seq + 1
            else:
                sub.cursor = self._announce_gap(sub, last_event_id)
        else:
            sub.cursor = self._start_position()
        self._lagging.add(sub)
        self._catch_up(sub)

    def _start_position(self) -> int:
        start, ring = self.route.start, self.ring
        if start.kind == "events":
            return max(ring.first_seq, ring.next_seq - start.count)
        if start.kind == "age":
            return ring.seq_since(self.clock() - start.age)
        return ring.next_seq

    def _announce_gap(self, sub: Subscriber, last_event_id: str) -> int:
        ring = self.ring
        evicted = ring.was_evicted(last_event_id)
        if evicted:
            self.stats.replay_gaps += 1
        else:
            self.stats.replay_misses += 1
        policy = self.route.on_gap
        payload = json.dumps(
            {
                "reason": "evicted" if evicted else "unknown",
                "last_event_id": last_event_id,
                "oldest_id": ring.oldest_id,
                "policy": policy,
            },
            separators=(",", ":"),
        )
        # The gap event repeats the client's own id so it does not move the
        # client's resume point: a reconnect before the next event gets the
        # same answer again. An id that can't be re-encoded is left out.
        try:
            gap = encode(Event(payload, event=GAP_EVENT, id=last_event_id))
        except ValueError:
            gap = encode(Event(payload, event=GAP_EVENT))
        sub.send(gap)
        return ring.first_seq if policy == "replay" else ring.next_seq

    def unsubscribe(self, sub: Subscriber) -> None:
        """The client went away (connection lost)."""
        if not sub.closed:
            self._drop(sub, DisconnectReason.CLIENT_CLOSED, abort=False, close=False)

    def pause(self, sub: Subscriber) -> None:
        """The client's transport buffer passed its high-water mark."""
        if sub.paused or sub.closed:
            return
        sub.paused = True
        live = self._live_chunked if sub.chunked else self._live_raw
        if sub in live:
            del live[sub]
            sub.cursor = self.ring.next_seq  # it was sent everything up to the head
            self._lagging.add(sub)

    def resume(self, sub: Subscriber) -> None:
        if sub.closed or not sub.paused:
            return
        sub.paused = False
        if sub not in self._pending:  # a waiting client has no cursor yet
            self._catch_up(sub)

    def _catch_up(self, sub: Subscriber) -> None:
        ring = self.ring
        while not sub.paused and not sub.closed:
            if sub.cursor < ring.first_seq:
                self._drop(sub, DisconnectReason.EVICTED, abort=True)
                return
            if sub.cursor >= ring.next_seq:
                self._lagging.discard(sub)
                live = self._live_chunked if sub.chunked else self._live_raw
                live[sub] = sub.transport.write
                return
            payload, stop = ring.take(sub.cursor, CATCH_UP_SLICE_BYTES)
            self.stats.events_delivered += stop - sub.cursor
            self.stats.bytes_out += len(payload)
            sub.cursor = stop
            sub.send(payload)

    def _drop(
        self, sub: Subscriber, reason: DisconnectReason, *, abort: bool, close: bool = True
    ) -> None:
        if sub.closed:
            return
        sub.closed = True
        self.budget.open -= 1
        self._live_chunked.pop(sub, None)
        self._live_raw.pop(sub, None)
        self._lagging.discard(sub)
        self._pending.discard(sub)
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
                self.route.path,
                reason,
                why,
            )
        if close:
            if abort:
                _reset_on_close(sub.transport)
                sub.transport.abort()  # a stuck client would never flush a graceful close
            else:
                sub.transport.close()
        if sub.on_close is not None:
            sub.on_close(reason)
        if self.client_count == 0 and self.route.mode == "lazy" and self._source_running:
            self._linger_handle = self.loop.call_later(self.route.linger, self._linger_expired)

    def _linger_expired(self) -> None:
        self._linger_handle = None
        if self.client_count == 0:
            self._stop_source()

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
        if self._pending:  # waiting clients' proxies must not time out either
            comment = encode_comment("")
            for sub in self._pending:
                if not sub.paused:
                    sub.send(comment)
        self.last_event_at = now
        self._schedule_heartbeat(interval)
