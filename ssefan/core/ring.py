"""Replay ring: encoded events by sequence number, bounded by count, bytes and age.

Sequence numbers are per-ring integers that only grow. A subscriber's position
is just "the seq of the next event it needs" (DESIGN.md: cursor, not queue), so
the ring is the only place event bytes live; subscribers never copy them.

No asyncio, no sockets: time is passed in by the caller.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from itertools import accumulate, islice
from typing import Any
from zlib import crc32

__all__ = ["Ring", "RingBudget"]

# Ids of recently evicted events are remembered (bounded, see below) so a
# reconnecting client can be told "evicted" rather than "unknown", each with a
# CRC-32 of its encoded bytes so that an app's replay of it after a reconnect
# can be told from a new event that reuses its id. How many: at least
# EVICTED_MEMORY_MIN, and EVICTED_MEMORY_FACTOR rings' worth; an id older than
# that is forgotten (an app reusing it again is taken at its word). Each entry
# is about 100 bytes: 400 KiB for the smallest memory.
EVICTED_MEMORY_MIN = 4096
EVICTED_MEMORY_FACTOR = 4
# Slots a ring starts with; it doubles up to max_events as events come. An
# idle ring of a template key then costs a few hundred bytes, not 4 lists of
# max_events pointers (32 KiB at the default 1000).
INITIAL_SLOTS = 8
# A reclaim brings the rings' bytes down to this share of the budget, so that
# one arrives every 5 % of the budget rather than with every event past it.
RECLAIM_TO = 0.95


class RingBudget:
    """The bytes every ring holds together, against `ring_bytes_total`.

    Rings add and subtract what they append and evict. Past the limit, the
    rings holding most lose their oldest events first (a ring's newest event
    always stays), down to RECLAIM_TO of the limit: a burst on one channel
    cannot grow memory without bound, and a quiet channel's short history is
    the last thing to go.
    """

    __slots__ = ("evictions", "held", "limit", "rings")

    def __init__(self, limit: int) -> None:
        self.limit = limit  # a reload may change it
        self.held = 0
        self.evictions = 0  # events evicted for the budget, not their ring's own bounds
        self.rings: set[Ring] = set()

    def reclaim(self) -> None:
        target = int(self.limit * RECLAIM_TO)
        # Biggest first; a ring goes back in the heap while it is still bigger
        # than the next, so the largest rings shrink towards each other.
        heap = [(-ring.held_bytes, id(ring), ring) for ring in self.rings if len(ring) > 1]
        heapq.heapify(heap)
        while self.held > target and heap:
            _, _, ring = heapq.heappop(heap)
            next_held = -heap[0][0] if heap else 0
            while self.held > target and len(ring) > 1 and ring.held_bytes >= next_held:
                ring._evict_oldest()
                self.evictions += 1
            if len(ring) > 1 and self.held > target:
                heapq.heappush(heap, (-ring.held_bytes, id(ring), ring))


class Ring:
    """A circular buffer of encoded events with an id -> seq index."""

    __slots__ = (
        "_budget",
        "_cap",
        "_data",
        "_evicted",
        "_evicted_cap",
        "_ids",
        "_index",
        "_max_age",
        "_max_bytes",
        "_slots",
        "_starts",
        "_times",
        "first_seq",
        "next_seq",
        "total_bytes",
    )

    def __init__(
        self,
        *,
        max_events: int,
        max_bytes: int,
        max_age: float,
        budget: RingBudget | None = None,
    ) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self._cap = max_events
        self._max_bytes = max_bytes
        self._max_age = max_age  # 0 = no age bound
        # The lists below have _slots entries (growing to _cap); seq s lives
        # at s % _slots.
        self._slots = slots = min(max_events, INITIAL_SLOTS)
        self._data: list[bytes] = [b""] * slots
        self._ids: list[str] = [""] * slots
        self._times: list[float] = [0.0] * slots
        # Byte offset (of all bytes ever appended) at which each entry starts;
        # bytes between two seqs is a subtraction, not a sum.
        self._starts: list[int] = [0] * slots
        self._index: dict[str, int] = {}
        self._evicted: dict[str, int] = {}  # id -> crc32 of the encoded event
        self._evicted_cap = max(EVICTED_MEMORY_MIN, max_events * EVICTED_MEMORY_FACTOR)
        self.first_seq = 0  # oldest seq held
        self.next_seq = 0  # seq the next appended event gets
        self.total_bytes = 0  # bytes ever appended (offset of next_seq)
        self._budget = budget
        if budget is not None:
            budget.rings.add(self)

    def release(self) -> None:
        """Leave the budget: the ring is discarded (its channel closed or rebuilt)."""
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.rings.discard(self)
            budget.held -= self.held_bytes

    # -- size ---------------------------------------------------------------

    def __len__(self) -> int:
        return self.next_seq - self.first_seq

    @property
    def held_bytes(self) -> int:
        return self.total_bytes - self.offset(self.first_seq)

    def offset(self, seq: int) -> int:
        """Byte offset at which `seq` starts (`seq` held, or == next_seq)."""
        if seq >= self.next_seq:
            return self.total_bytes
        return self._starts[seq % self._slots]

    def bytes_from(self, seq: int) -> int:
        """Encoded bytes from `seq` (held) up to the head."""
        return self.total_bytes - self.offset(seq)

    # -- writing ------------------------------------------------------------

    def append(self, event_id: str, data: bytes, now: float) -> int:
        """Store one encoded event; evict what no longer fits. Returns its seq."""
        seq = self.next_seq
        held = seq - self.first_seq
        if held == self._slots:
            if held == self._cap:
                self._evict_oldest()
            else:
                self._grow()
        i = seq % self._slots
        self._data[i] = data
        self._ids[i] = event_id
        self._times[i] = now
        self._starts[i] = self.total_bytes
        self.total_bytes += len(data)
        self.next_seq = seq + 1
        if event_id:
            self._index[event_id] = seq
        # The newest event always stays, even if it alone passes max_bytes:
        # dropping it would lose it for every subscriber that is behind.
        while self.held_bytes > self._max_bytes and len(self) > 1:
            self._evict_oldest()
        self.expire(now)
        budget = self._budget
        if budget is not None:
            budget.held += len(data)
            if budget.held > budget.limit:
                budget.reclaim()
        return seq

    def _grow(self) -> None:
        """Double the slots (up to max_events), keeping every held seq's place."""
        old, slots = self._slots, min(self._cap, self._slots * 2)
        held = range(self.first_seq, self.next_seq)
        data: list[bytes] = [b""] * slots
        ids: list[str] = [""] * slots
        times: list[float] = [0.0] * slots
        starts: list[int] = [0] * slots
        for seq in held:
            i, j = seq % slots, seq % old
            data[i], ids[i], times[i], starts[i] = (
                self._data[j],
                self._ids[j],
                self._times[j],
                self._starts[j],
            )
        self._data, self._ids, self._times, self._starts = data, ids, times, starts
        self._slots = slots

    def expire(self, now: float) -> None:
        """Evict events older than the age bound (the newest always stays)."""
        if not self._max_age:
            return
        limit = now - self._max_age
        while len(self) > 1 and self._times[self.first_seq % self._slots] < limit:
            self._evict_oldest()

    def clear(self) -> None:
        while len(self):
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        seq = self.first_seq
        i = seq % self._slots
        event_id = self._ids[i]
        if event_id and self._index.get(event_id) == seq:
            del self._index[event_id]
            self._evicted[event_id] = crc32(self._data[i])
            if len(self._evicted) > self._evicted_cap:
                del self._evicted[next(iter(self._evicted))]
        if self._budget is not None:
            self._budget.held -= len(self._data[i])
        self._data[i] = b""
        self.first_seq = seq + 1

    # -- reading ------------------------------------------------------------

    def seq_of(self, event_id: str) -> int | None:
        """The newest held seq carrying `event_id`, or None."""
        return self._index.get(event_id)

    def was_evicted(self, event_id: str) -> bool:
        return event_id in self._evicted

    def holds_copy(self, event_id: str, encoded: bytes) -> bool:
        """True if the ring holds or held an event with this id and these bytes.

        Held events are compared byte for byte; evicted ones by CRC-32 (a new
        event with a reused id whose CRC collides is taken for a replay: one
        chance in 2**32).
        """
        seq = self._index.get(event_id)
        if seq is not None:
            return self._data[seq % self._slots] == encoded
        digest = self._evicted.get(event_id)
        return digest is not None and digest == crc32(encoded)

    def remember_evicted_of(self, other: Ring) -> None:
        """Take over `other`'s memory of evicted ids (a rebuilt ring)."""
        self._evicted.update(other._evicted)

    def evicted_memory(self) -> tuple[list[str], list[int]]:
        """The evicted-id memory: the ids, oldest first, and the CRC-32 of each's
        encoded bytes (two lists, so a snapshot makes no tuple per id)."""
        return list(self._evicted), list(self._evicted.values())

    def remember_evicted(self, ids: Iterable[str], digests: Iterable[int]) -> None:
        """Add ids with their CRC-32s to the evicted-id memory, as if evicted
        in this order (a restored ring); past its bound the oldest are forgotten."""
        evicted = self._evicted
        evicted.update(zip(ids, digests, strict=True))
        excess = len(evicted) - self._evicted_cap
        if excess > 0:
            for event_id in list(islice(evicted, excess)):
                del evicted[event_id]

    def held(self) -> tuple[list[str], list[bytes], list[float]]:
        """The held events' ids, encoded bytes and times, oldest first (copies
        of the lists, sharing the bytes: a snapshot takes them in one go)."""
        n, slots = len(self), self._slots
        i = self.first_seq % slots
        if i + n <= slots:
            return self._ids[i : i + n], self._data[i : i + n], self._times[i : i + n]
        j = i + n - slots
        return (
            self._ids[i:] + self._ids[:j],
            self._data[i:] + self._data[:j],
            self._times[i:] + self._times[:j],
        )

    def restore(self, ids: Sequence[str], data: Sequence[bytes], times: Sequence[float]) -> None:
        """Append many events to an empty ring at once (a restored ring).

        The outcome is that of `append` for each in turn (the same seqs, the
        same events held within the bounds, the same evicted-id memory, oldest
        first) but for an id carried by two of them, which is remembered as
        its newest's only; it costs list copies rather than a Python call per
        event. `times` must not decrease.

        Raises:
            ValueError: the ring holds events, or the lists differ in length.
        """
        n = len(ids)
        if len(self):
            raise ValueError(f"restore into a ring holding {len(self)} events")
        if len(data) != n or len(times) != n:
            raise ValueError("restore: ids, data and times differ in length")
        if not n:
            return
        # What the count bound would evict at once: never placed, only remembered.
        drop = max(0, n - self._cap)
        if drop:
            gone = [i for i in range(drop) if ids[i]]
            self.remember_evicted([ids[i] for i in gone], [crc32(data[i]) for i in gone])
            ids, data, times = ids[drop:], data[drop:], times[drop:]
            n -= drop
        first = self.first_seq + drop
        slots = self._slots
        while slots < n:
            slots = min(self._cap, slots * 2)
        starts = list(accumulate(map(len, data), initial=self.total_bytes))
        columns: list[tuple[list[Any], Sequence[Any]]] = [
            ([b""] * slots, data),
            ([""] * slots, ids),
            ([0.0] * slots, times),
            ([0] * slots, starts[:-1]),
        ]
        # Seq s lives at s % slots: the run wraps at most once.
        i = first % slots
        head = min(n, slots - i)
        for column, values in columns:
            column[i : i + head] = values[:head]
            column[: n - head] = values[head:]
        self._data, self._ids, self._times, self._starts = (c for c, _ in columns)
        self._slots = slots
        self.first_seq, self.next_seq = first, first + n
        self.total_bytes = starts[-1]
        index = self._index
        index.update(zip(ids, range(first, first + n), strict=True))
        index.pop("", None)
        budget = self._budget
        if budget is not None:
            budget.held += starts[-1] - starts[0]
        while self.held_bytes > self._max_bytes and len(self) > 1:
            self._evict_oldest()
        self.expire(times[-1])
        if budget is not None and budget.held > budget.limit:
            budget.reclaim()

    def start_at(self, seq: int) -> None:
        """Number an empty ring's next event `seq` (a restored or rebuilt ring
        keeps the numbering its cursors and ids were made with).

        Raises:
            ValueError: the ring holds events, or `seq` is negative.
        """
        if len(self):
            raise ValueError(f"start_at({seq}) on a ring holding {len(self)} events")
        if seq < 0:
            raise ValueError(f"start_at({seq}): seqs are >= 0")
        self.first_seq = self.next_seq = seq

    def resized(self, *, max_events: int, max_bytes: int, max_age: float) -> Ring:
        """A ring with other bounds holding this one's events and evicted-id
        memory under the same seqs, so a cursor into this ring means the same
        event in that one. What the new bounds can't hold is evicted as by
        any append."""
        budget = self._budget
        self.release()  # the new ring counts these bytes instead
        ring = Ring(max_events=max_events, max_bytes=max_bytes, max_age=max_age, budget=budget)
        ring.remember_evicted_of(self)
        ring.start_at(self.first_seq)
        for seq in range(self.first_seq, self.next_seq):
            ring.append(self.id_at(seq), self.join(seq, seq + 1), self.time_at(seq))
        return ring

    def id_at(self, seq: int) -> str:
        return self._ids[seq % self._slots]

    def time_at(self, seq: int) -> float:
        return self._times[seq % self._slots]

    @property
    def oldest_id(self) -> str | None:
        return self._ids[self.first_seq % self._slots] if len(self) else None

    @property
    def newest_id(self) -> str | None:
        return self._ids[(self.next_seq - 1) % self._slots] if len(self) else None

    def seq_since(self, t: float) -> int:
        """The first held seq stamped at or after `t` (next_seq if none)."""
        lo, hi = self.first_seq, self.next_seq
        times, cap = self._times, self._slots
        while lo < hi:  # times are non-decreasing: binary search
            mid = (lo + hi) // 2
            if times[mid % cap] < t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def join(self, start: int, stop: int) -> bytes:
        """The encoded events [start, stop) as one bytes object."""
        cap, data = self._slots, self._data
        if stop - start == 1:
            return data[start % cap]
        return b"".join([data[s % cap] for s in range(start, stop)])

    def take(self, start: int, max_bytes: int) -> tuple[bytes, int]:
        """Events from `start` up to about `max_bytes` (at least one event).

        Returns the joined bytes and the seq after the last event taken.
        """
        base = self.offset(start)
        stop = start + 1
        while stop < self.next_seq and self._starts[stop % self._slots] - base < max_bytes:
            stop += 1
        return self.join(start, stop), stop
