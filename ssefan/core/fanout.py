"""What an upstream read becomes before anyone is written to: sans-I/O.

`Intake.accept` takes one read's parsed items and returns the encoded events
to fan out, having appended them to the ring. The rules it applies:

* Right after an upstream (re)connect (`reconnected()`), an event the ring
  holds or held with the same id *and the same bytes* is a replay of what
  ssefan already sent: dropped, until the first event that is new.
* An event whose id already named another event (an app that restarts its ids
  per connection or on a deploy) is kept, under an id of ssefan's, so every id
  a client sees names one event and a later Last-Event-ID is never ambiguous.
* An event without an id, or with one that could not come back as a
  Last-Event-ID header, gets an id of ssefan's: `<prefix><seq>`.
* An id-only block moves the resume point (the ring holds it) unless its id is
  taken.

No asyncio, no sockets, no logging: the channel around it counts, logs and
writes (stream/channel.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ssefan.core.ring import Ring
from ssefan.core.sse import Event, IdOnly, Overflow, encode_id, encode_with_id, resumable_id

__all__ = ["Accepted", "Intake"]


@dataclass(slots=True)
class Accepted:
    """What one read became."""

    events: list[bytes] = field(default_factory=list)  # encoded, in order, in the ring
    replays: int = 0  # dropped as replays of events already sent
    reused: list[tuple[str, str]] = field(default_factory=list)  # (the app's id, the id given)
    overflows: list[Overflow] = field(default_factory=list)  # dropped by the parser for size


class Intake:
    """Upstream items into the ring, with replay detection and id assignment."""

    __slots__ = ("_replaying", "id_prefix", "last_upstream_id", "ring")

    def __init__(self, ring: Ring, id_prefix: str) -> None:
        self.ring = ring
        # Ids ssefan assigns: a prefix per channel instance so that ids from an
        # older process or ring never alias these.
        self.id_prefix = id_prefix
        # The last id the *upstream* gave: sent back as Last-Event-ID on reconnect.
        self.last_upstream_id = ""
        self._replaying = False

    def reconnected(self) -> None:
        """A new upstream response began: it may open with a replay."""
        self._replaying = True

    def next_assigned_id(self) -> str:
        return f"{self.id_prefix}{self.ring.next_seq}"

    def accept(self, items: Iterable[Event | IdOnly | Overflow], now: float) -> Accepted:
        ring = self.ring
        out = Accepted()
        # The batch is returned from this list, not read back from the ring: a
        # batch larger than the ring would have evicted its own first events.
        events = out.events
        for item in items:
            if isinstance(item, Overflow):
                out.overflows.append(item)
                continue
            upstream_id = item.id
            if upstream_id is not None:
                self.last_upstream_id = upstream_id
            # An id that can't travel back as a Last-Event-ID header (leading
            # space, VT, FF) could never be resumed from: clients get ours.
            resumable = known = False
            if upstream_id is not None and resumable_id(upstream_id):
                resumable = True
                known = ring.seq_of(upstream_id) is not None or ring.was_evicted(upstream_id)
            if isinstance(item, IdOnly):
                if resumable and not known:
                    self._replaying = False
                    encoded = encode_id(item.id)
                    ring.append(item.id, encoded, now)
                    events.append(encoded)
                elif known and self._replaying:
                    out.replays += 1
                continue
            if known:
                assert upstream_id is not None
                encoded = encode_with_id(item, upstream_id)
                if self._replaying and ring.holds_copy(upstream_id, encoded):
                    out.replays += 1
                    continue
                event_id = self.next_assigned_id()
                out.reused.append((upstream_id, event_id))
            else:
                event_id = upstream_id if resumable and upstream_id else self.next_assigned_id()
            self._replaying = False
            encoded = encode_with_id(item, event_id)
            ring.append(event_id, encoded, now)
            events.append(encoded)
        return out
