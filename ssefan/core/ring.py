"""Replay ring: encoded events by sequence number, bounded by count, bytes and age.

Sequence numbers are per-ring integers that only grow. A subscriber's position
is just "the seq of the next event it needs" (DESIGN.md: cursor, not queue), so
the ring is the only place event bytes live; subscribers never copy them.

No asyncio, no sockets: time is passed in by the caller.
"""

from __future__ import annotations

from zlib import crc32

__all__ = ["Ring"]

# Ids of recently evicted events are remembered (bounded, see below) so a
# reconnecting client can be told "evicted" rather than "unknown", each with a
# CRC-32 of its encoded bytes so that an app's replay of it after a reconnect
# can be told from a new event that reuses its id. How many: at least
# EVICTED_MEMORY_MIN, and EVICTED_MEMORY_FACTOR rings' worth; an id older than
# that is forgotten (an app reusing it again is taken at its word). Each entry
# is about 100 bytes: 400 KiB for the smallest memory.
EVICTED_MEMORY_MIN = 4096
EVICTED_MEMORY_FACTOR = 4


class Ring:
    """A circular buffer of encoded events with an id -> seq index."""

    __slots__ = (
        "_cap",
        "_data",
        "_evicted",
        "_evicted_cap",
        "_ids",
        "_index",
        "_max_age",
        "_max_bytes",
        "_starts",
        "_times",
        "first_seq",
        "next_seq",
        "total_bytes",
    )

    def __init__(self, *, max_events: int, max_bytes: int, max_age: float) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self._cap = max_events
        self._max_bytes = max_bytes
        self._max_age = max_age  # 0 = no age bound
        self._data: list[bytes] = [b""] * max_events
        self._ids: list[str] = [""] * max_events
        self._times: list[float] = [0.0] * max_events
        # Byte offset (of all bytes ever appended) at which each entry starts;
        # bytes between two seqs is a subtraction, not a sum.
        self._starts: list[int] = [0] * max_events
        self._index: dict[str, int] = {}
        self._evicted: dict[str, int] = {}  # id -> crc32 of the encoded event
        self._evicted_cap = max(EVICTED_MEMORY_MIN, max_events * EVICTED_MEMORY_FACTOR)
        self.first_seq = 0  # oldest seq held
        self.next_seq = 0  # seq the next appended event gets
        self.total_bytes = 0  # bytes ever appended (offset of next_seq)

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
        return self._starts[seq % self._cap]

    def bytes_from(self, seq: int) -> int:
        """Encoded bytes from `seq` (held) up to the head."""
        return self.total_bytes - self.offset(seq)

    # -- writing ------------------------------------------------------------

    def append(self, event_id: str, data: bytes, now: float) -> int:
        """Store one encoded event; evict what no longer fits. Returns its seq."""
        seq = self.next_seq
        if seq - self.first_seq == self._cap:
            self._evict_oldest()
        i = seq % self._cap
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
        return seq

    def expire(self, now: float) -> None:
        """Evict events older than the age bound (the newest always stays)."""
        if not self._max_age:
            return
        limit = now - self._max_age
        while len(self) > 1 and self._times[self.first_seq % self._cap] < limit:
            self._evict_oldest()

    def clear(self) -> None:
        while len(self):
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        seq = self.first_seq
        i = seq % self._cap
        event_id = self._ids[i]
        if event_id and self._index.get(event_id) == seq:
            del self._index[event_id]
            self._evicted[event_id] = crc32(self._data[i])
            if len(self._evicted) > self._evicted_cap:
                del self._evicted[next(iter(self._evicted))]
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
            return self._data[seq % self._cap] == encoded
        digest = self._evicted.get(event_id)
        return digest is not None and digest == crc32(encoded)

    def remember_evicted_of(self, other: Ring) -> None:
        """Take over `other`'s memory of evicted ids (a rebuilt ring)."""
        self._evicted.update(other._evicted)

    def id_at(self, seq: int) -> str:
        return self._ids[seq % self._cap]

    def time_at(self, seq: int) -> float:
        return self._times[seq % self._cap]

    @property
    def oldest_id(self) -> str | None:
        return self._ids[self.first_seq % self._cap] if len(self) else None

    @property
    def newest_id(self) -> str | None:
        return self._ids[(self.next_seq - 1) % self._cap] if len(self) else None

    def seq_since(self, t: float) -> int:
        """The first held seq stamped at or after `t` (next_seq if none)."""
        lo, hi = self.first_seq, self.next_seq
        times, cap = self._times, self._cap
        while lo < hi:  # times are non-decreasing: binary search
            mid = (lo + hi) // 2
            if times[mid % cap] < t:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def join(self, start: int, stop: int) -> bytes:
        """The encoded events [start, stop) as one bytes object."""
        cap, data = self._cap, self._data
        if stop - start == 1:
            return data[start % cap]
        return b"".join([data[s % cap] for s in range(start, stop)])

    def take(self, start: int, max_bytes: int) -> tuple[bytes, int]:
        """Events from `start` up to about `max_bytes` (at least one event).

        Returns the joined bytes and the seq after the last event taken.
        """
        base = self.offset(start)
        stop = start + 1
        while stop < self.next_seq and self._starts[stop % self._cap] - base < max_bytes:
            stop += 1
        return self.join(start, stop), stop
