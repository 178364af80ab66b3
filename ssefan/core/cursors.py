"""Where each client of a channel stands in the ring, and when it is cut off: sans-I/O.

DESIGN.md, "cursor, not queue". A client's stream is in one of three places:

* live: it has been sent everything up to the ring's head. The fan-out writes
  the shared bytes to it directly, so it needs no cursor. Live clients are
  kept with their writers, split by framing, so the fan-out loop never
  branches and calls nothing per client but the write.
* lagging: its transport pushed back (paused), or it is still replaying. It
  holds a cursor, the seq of the next event it needs, and nothing else.
* waiting: a `start: live` client that came while the upstream was not yet
  past its catch-up backlog (see Backlog). It has no cursor yet and starts at
  the ring's head once the backlog has passed.

The rules:

* A new client starts after the event its Last-Event-ID names if the ring
  holds it. Otherwise it is told so in band (GAP_EVENT) and starts by the
  route's `on_gap`. Without an id it starts by the route's `start`.
* A lagging client that is not paused catches up from the ring in slices of
  at most `slice_bytes`, going on while its transport takes them, and joins
  the live set when it reaches the head.
* A lagging client whose cursor fell off the ring's tail is cut off
  (EVICTED), and so is one whose unsent bytes (the ring's bytes after its
  cursor plus what its transport still holds) pass `max_lag_bytes` (SLOW).
  Either resumes by reconnecting with its Last-Event-ID.

No asyncio, no sockets, no clock of its own: bytes reach a client through the
client (`Reader.send`, `Reader.writer`), cutting one off is the channel's
(`cut`: its transport, its stream accounting and its log line), and times
are passed in (stream/channel.py is the shell around this).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

from ssefan.core.ring import Ring
from ssefan.core.sse import Event, encode

__all__ = [
    "CATCH_UP_FIRST_READ",
    "CATCH_UP_MAX",
    "CATCH_UP_QUIET",
    "GAP_EVENT",
    "Backlog",
    "Cursors",
    "DisconnectReason",
    "Reader",
    "StartRule",
    "Tally",
]

# The named event a client receives when its Last-Event-ID can't be resumed
# exactly (unknown or already evicted). Browsers see events, not headers.
GAP_EVENT = "ssefan-gap"

# After an upstream (re)connect that sent a Last-Event-ID, the app may first
# send the backlog since that id: events published before a new client came.
# A client without a resume position (`start: live`) that connects while the
# upstream is down or catching up waits until the backlog has passed, so it
# starts at the first event after it. The backlog counts as passed once the
# upstream has been quiet this long after a read (a backlog arrives in
# back-to-back reads)...
CATCH_UP_QUIET = 0.05
# ...or this long after the response began with no read at all (an app that
# had nothing to replay, or takes a moment to start)...
CATCH_UP_FIRST_READ = 0.25
# ...and at the latest this long after the response began (an app that
# streams fast enough never goes quiet).
CATCH_UP_MAX = 1.0


class DisconnectReason(enum.StrEnum):
    """How a client's stream ended (counted per reason)."""

    CLIENT_CLOSED = "client_closed"
    SLOW = "slow"  # unsent data passed max_client_lag_bytes
    EVICTED = "evicted"  # its cursor fell off the ring's tail
    UPSTREAM_STOPPED = "upstream_stopped"  # the app answered 204
    DRAIN = "drain"  # shutdown or route removed
    REVOKED = "revoked"  # forward-auth no longer admits its credential
    LIMIT = "limit"  # refused at connect: the route's or the global max_clients
    ERROR = "error"


class Reader(Protocol):
    """What the policy needs of a client's stream (stream.channel.Subscriber)."""

    cursor: int  # seq of the next event it needs (meaningful when not live)
    paused: bool  # its transport pushed back; set here only

    @property
    def chunked(self) -> bool: ...

    @property
    def closed(self) -> bool: ...

    @property
    def writer(self) -> Callable[[bytes], object]:
        """Its transport's write, for bytes framed already (the shared fan-out path)."""
        ...

    def send(self, payload: bytes) -> None:
        """Write `payload`, framed for this client."""

    def unsent(self) -> int:
        """Bytes its transport holds that the client has not taken yet."""
        ...


class Tally(Protocol):
    """The counters the policy bumps where the work happens (stream.channel.ChannelStats)."""

    events_delivered: int
    bytes_out: int
    replay_hits: int  # resumed exactly from a held id
    replay_misses: int  # id unknown to the ring
    replay_gaps: int  # id was held once but has been evicted


class StartRule(Protocol):
    """Where a client without a Last-Event-ID starts (config.StartConfig)."""

    @property
    def kind(self) -> str: ...  # "live", "events" or "age"

    @property
    def count(self) -> int: ...

    @property
    def age(self) -> float: ...


R = TypeVar("R", bound=Reader)


class Cursors(Generic[R]):
    """One channel's clients by where they stand, and the moves between places."""

    __slots__ = (
        "cut",
        "lagging",
        "live_chunked",
        "live_raw",
        "max_lag_bytes",
        "ring",
        "slice_bytes",
        "tally",
        "waiting",
    )

    def __init__(
        self,
        ring: Ring,
        *,
        max_lag_bytes: int,
        slice_bytes: int,
        tally: Tally,
        cut: Callable[[R, DisconnectReason], None],
    ) -> None:
        self.ring = ring  # the channel replaces it on a resize (then call resized())
        self.max_lag_bytes = max_lag_bytes  # the route's max_client_lag_bytes
        self.slice_bytes = slice_bytes  # at most this much per catch-up write
        self.tally = tally
        # Ends a client's stream at once; the channel's, which calls remove().
        self.cut = cut
        # Never rebound: the channel's fan-out loop holds these very objects.
        self.live_chunked: dict[R, Callable[[bytes], object]] = {}
        self.live_raw: dict[R, Callable[[bytes], object]] = {}
        self.lagging: set[R] = set()
        self.waiting: set[R] = set()

    def __len__(self) -> int:
        return len(self.live_chunked) + len(self.live_raw) + len(self.lagging) + len(self.waiting)

    def __iter__(self) -> Iterator[R]:
        yield from self.live_chunked
        yield from self.live_raw
        yield from self.lagging
        yield from self.waiting

    # -- joining ----------------------------------------------------------------

    def join(
        self,
        reader: R,
        last_event_id: str | None,
        *,
        start: StartRule,
        on_gap: str,
        at_head: bool,
        now: float,
    ) -> None:
        """Place a new client and send it what it is owed from the ring.

        `at_head` says whether events from now on are surely after this
        connect (the upstream streams and is past its backlog); if not, a
        client that starts live waits for `backlog_passed()`.
        """
        if not last_event_id and start.kind == "live" and not at_head:
            # No events yet that are surely after this connect: wait for them.
            self.waiting.add(reader)
            return
        ring = self.ring
        if last_event_id:
            seq = ring.seq_of(last_event_id)
            if seq is not None:
                self.tally.replay_hits += 1
                reader.cursor = seq + 1
            else:
                reader.cursor = self._announce_gap(reader, last_event_id, on_gap)
        else:
            reader.cursor = self._start_position(start, now)
        self.lagging.add(reader)
        self.catch_up(reader)

    def _start_position(self, start: StartRule, now: float) -> int:
        ring = self.ring
        if start.kind == "events":
            return max(ring.first_seq, ring.next_seq - start.count)
        if start.kind == "age":
            return ring.seq_since(now - start.age)
        return ring.next_seq

    def _announce_gap(self, reader: R, last_event_id: str, on_gap: str) -> int:
        ring = self.ring
        evicted = ring.was_evicted(last_event_id)
        if evicted:
            self.tally.replay_gaps += 1
        else:
            self.tally.replay_misses += 1
        payload = json.dumps(
            {
                "reason": "evicted" if evicted else "unknown",
                "last_event_id": last_event_id,
                "oldest_id": ring.oldest_id,
                "policy": on_gap,
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
        reader.send(gap)
        return ring.first_seq if on_gap == "replay" else ring.next_seq

    def backlog_passed(self) -> None:
        """The upstream is live: waiting clients start at the ring's head."""
        waiting, self.waiting = self.waiting, set()
        head = self.ring.next_seq
        for reader in waiting:
            reader.cursor = head
            self.lagging.add(reader)
            self.catch_up(reader)

    # -- backpressure -----------------------------------------------------------

    def pause(self, reader: R) -> None:
        """Its transport buffer passed the high-water mark: no more live writes."""
        if reader.paused or reader.closed:
            return
        reader.paused = True
        live = self.live_chunked if reader.chunked else self.live_raw
        if reader in live:
            del live[reader]
            reader.cursor = self.ring.next_seq  # it was sent everything up to the head
            self.lagging.add(reader)

    def resume(self, reader: R) -> None:
        """Its transport drained to the low-water mark: catch up from the cursor."""
        if reader.closed or not reader.paused:
            return
        reader.paused = False
        if reader not in self.waiting:  # a waiting client has no cursor yet
            self.catch_up(reader)

    def catch_up(self, reader: R) -> None:
        """Send a lagging client the ring from its cursor, slice by slice, until
        its transport pushes back, it is cut off, or it is live again."""
        ring, tally = self.ring, self.tally
        while not reader.paused and not reader.closed:
            if reader.cursor < ring.first_seq:
                self.cut(reader, DisconnectReason.EVICTED)
                return
            if reader.cursor >= ring.next_seq:
                self.lagging.discard(reader)
                live = self.live_chunked if reader.chunked else self.live_raw
                live[reader] = reader.writer
                return
            payload, stop = ring.take(reader.cursor, self.slice_bytes)
            tally.events_delivered += stop - reader.cursor
            tally.bytes_out += len(payload)
            reader.cursor = stop
            reader.send(payload)

    # -- cutting off ------------------------------------------------------------

    def cut_laggards(self) -> None:
        """Cut off every lagging client the ring has left behind or that is too
        far behind (after an append, or when the ring shrank)."""
        ring, limit = self.ring, self.max_lag_bytes
        for reader in list(self.lagging):
            if reader.cursor < ring.first_seq:
                self.cut(reader, DisconnectReason.EVICTED)
            elif ring.bytes_from(reader.cursor) + reader.unsent() > limit:
                self.cut(reader, DisconnectReason.SLOW)

    def resized(self, ring: Ring) -> None:
        """The channel rebuilt its ring with other bounds (same seqs)."""
        self.ring = ring
        if self.lagging:
            self.cut_laggards()  # a smaller ring may have dropped their place

    def remove(self, reader: R) -> None:
        """Forget `reader` wherever it stands (its stream ended)."""
        self.live_chunked.pop(reader, None)
        self.live_raw.pop(reader, None)
        self.lagging.discard(reader)
        self.waiting.discard(reader)


class Backlog:
    """When the app's backlog after a resumed upstream connect has passed.

    Only the arithmetic: the channel keeps the timer, arms it for what these
    return, and calls `Cursors.backlog_passed()` when it fires.
    """

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline = 0.0

    def began(self, now: float) -> float:
        """A response to a request with Last-Event-ID began: how long to wait
        for a first read."""
        self.deadline = now + CATCH_UP_MAX
        return CATCH_UP_FIRST_READ

    def read(self, now: float) -> float:
        """A read came during the backlog: it has passed if no other comes
        within what this returns."""
        return min(CATCH_UP_QUIET, max(0.0, self.deadline - now))
