"""One channel's ring as bytes on disk, and back: sans-I/O.

Two formats, both version 1 and laid out byte by byte in docs/state-format.md:

* a **snapshot** holds a whole `RingState` (identity, id prefix, last upstream
  id, seqs, the held events, the evicted-id memory) under one CRC-32 of the
  whole file. It is written whole and replaced atomically (stream/state.py),
  so a reader finds the old one or the new one, never a mix.
* a **journal** is a header and then records appended in batches between
  snapshots: EVENT (one ring append: seq, wall time, id, encoded bytes) and
  MARK (the last upstream id moved). Each record has its own length and
  CRC-32, so a reader keeps everything before the first record that is torn
  (normal after a crash) or damaged (not normal), and says which and where.

A journal names the snapshot it follows by its `generation` (a count of the
snapshots taken of the channel). It is applied on top of that snapshot, or of
none; a journal *older* than the snapshot (the process died between writing a
snapshot and starting the journal after it) holds nothing the snapshot lacks
and is ignored. Within an applied journal, an EVENT below the state's next seq
is one the state already has (skipped); one above it means the events between
are lost, so the ring starts again at that seq (the events it held are
remembered as evicted, so a client holding one of their ids is told it was
evicted rather than that it is unknown).

Times: the ring stamps events with the caller's monotonic clock, which means
nothing in another process, so files hold wall-clock times; `capture` and
`restore_into` convert with a (monotonic, wall) pair of "now"s.

Decoding validates everything and raises `BadState(reason)` with a reason for
people. A length read from a file is checked against `max_record_bytes`
before anything is sliced for it, and a count against the bytes the file
has left, so damage can't make a reader allocate more than the file backs or
a record more than the limit. Nothing here opens a file (stream/state.py does).
"""

from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate, pairwise
from typing import Any
from zlib import crc32

from ssefan.core.fanout import Intake
from ssefan.core.ring import Ring
from ssefan.core.sse import resumable_id

__all__ = [
    "JOURNAL_MAGIC",
    "SNAPSHOT_MAGIC",
    "VERSION",
    "BadState",
    "ChannelId",
    "EventRecord",
    "JournalHeader",
    "JournalRead",
    "MarkRecord",
    "RingState",
    "apply_journal",
    "capture",
    "decode_journal",
    "decode_journal_header",
    "decode_snapshot",
    "encode_snapshot",
    "journal_event",
    "journal_header",
    "journal_mark",
    "peek_identity",
    "record_limit",
    "restore_into",
]

# PNG-style magics: a high byte first (a file that went through a 7-bit or
# text-mode transfer is refused at once), then a readable name.
SNAPSHOT_MAGIC = b"\x89SSEsnap"
JOURNAL_MAGIC = b"\x89SSEjrnl"
VERSION = 1

# Snapshot flag bit 0: written by a clean stop as the process's last act, so
# nothing was handed out after it (no journal follows it).
FLAG_FINAL = 0x0001

_PREAMBLE = struct.Struct("<8sH")  # magic, version: the part every version keeps
# magic, version, flags, total length, generation, worker, saved at (wall),
# first seq, next seq, event count, evicted count
_SNAP_FIXED = struct.Struct("<8sHHQQIdQQQI")
# magic, version, flags, header length, generation, worker, start seq
_JRNL_FIXED = struct.Struct("<8sHHIQIQ")
_REC_HEAD = struct.Struct("<II")  # payload length, crc32(payload)
_EVENT_HEAD = struct.Struct("<BQdI")  # type, seq, wall time, id length
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

EVENT = 1
MARK = 2

# Seqs are u64 on disk but Python ints; keep them where every reader can
# still add one (and where a damaged one is caught rather than believed).
MAX_SEQ = 2**63 - 1
_ID_FORBIDDEN = ("\r", "\n", "\0")


def record_limit(max_event_bytes: int, max_line_bytes: int) -> int:
    """The largest record a route's events can make, for `max_record_bytes`.

    An encoded event is at most 7 bytes per byte of the parser's data buffer
    (`max_event_bytes`): an LF becomes "\\ndata: ", an invalid UTF-8 byte the
    3 bytes of U+FFFD. Its id and event lines are at most 3x a line
    (`max_line_bytes`) each, and a journal record carries the id once more,
    plus a fixed head. Anything longer was not written by ssefan for this route.
    """
    return 7 * max_event_bytes + 9 * max_line_bytes + 64


class BadState(Exception):
    """A state file is not usable: truncated, damaged, foreign or of another
    version. `reason` says which for a log line; the channel starts empty."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ChannelId:
    """Which channel a file belongs to: a route (its path), a template key's
    display string ("" for a static route) and the worker that owns it."""

    route: str
    key: str
    worker: int

    def __post_init__(self) -> None:
        # NUL separates the fields where an identity is hashed into a file
        # name (stream/state.py); neither a route path nor a template key can
        # hold one (config refuses control characters, keys too: core.template).
        if "\0" in self.route or "\0" in self.key:
            raise ValueError(f"a channel identity holds NUL: {self.route!r}, {self.key!r}")
        if not 0 <= self.worker < 2**32:
            raise ValueError(f"worker {self.worker} out of range")


@dataclass(frozen=True, slots=True)
class RingState:
    """One channel's ring and intake as a value: what a snapshot holds.

    The held events as columns: seq `first_seq + i` is `ids[i]`, `data[i]`
    (its encoded bytes) and `walls[i]` (its wall-clock time). Columns, not a
    tuple per event, because a full ring holds tens of thousands and the
    collector's passes over that many tuples would cost more than the rest of
    a snapshot (`events` gives the rows). The evicted-id memory likewise:
    `evicted_ids[i]` with the CRC-32 of its encoded bytes `evicted_digests[i]`,
    oldest first. No id holds LF (none an SSE stream carries can; the
    encoders refuse one). `generation` counts the snapshots taken of the channel (a
    journal names the one it follows). `final`: written by a clean stop,
    nothing was handed out after it.
    """

    route: str
    key: str
    worker: int
    id_prefix: str
    last_upstream_id: str
    first_seq: int
    next_seq: int
    ids: tuple[str, ...] = ()
    data: tuple[bytes, ...] = ()
    walls: tuple[float, ...] = ()
    evicted_ids: tuple[str, ...] = ()
    evicted_digests: tuple[int, ...] = ()
    generation: int = 0
    saved_at: float = 0.0
    final: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.first_seq <= self.next_seq <= MAX_SEQ:
            raise ValueError(f"seqs {self.first_seq}..{self.next_seq} out of order or range")
        held = self.next_seq - self.first_seq
        if not len(self.ids) == len(self.data) == len(self.walls) == held:
            raise ValueError(
                f"{len(self.ids)} ids, {len(self.data)} events and {len(self.walls)} times"
                f" for seqs {self.first_seq}..{self.next_seq}"
            )
        if len(self.evicted_ids) != len(self.evicted_digests):
            raise ValueError(
                f"{len(self.evicted_ids)} evicted ids, {len(self.evicted_digests)} digests"
            )
        ChannelId(self.route, self.key, self.worker)  # checks them
        if not 0 <= self.generation <= MAX_SEQ:
            raise ValueError(f"generation {self.generation} out of range")
        # Assigned ids are prefix + seq; they go out in `id:` lines and come
        # back as Last-Event-ID, so the prefix must make resumable ids.
        if not resumable_id(f"{self.id_prefix}0") or _bad_id(self.id_prefix):
            raise ValueError(f"id prefix {self.id_prefix!r} cannot start a resumable id")
        # Sent upstream as a Last-Event-ID header value.
        if _bad_id(self.last_upstream_id):
            raise ValueError(f"last upstream id {self.last_upstream_id!r} holds CR, LF or NUL")

    @property
    def identity(self) -> ChannelId:
        return ChannelId(self.route, self.key, self.worker)

    @property
    def events(self) -> list[tuple[str, bytes, float]]:
        """The held events as (id, encoded bytes, wall time) rows, oldest first."""
        return list(zip(self.ids, self.data, self.walls, strict=True))

    @property
    def evicted(self) -> list[tuple[str, int]]:
        """The evicted-id memory as (id, CRC-32) rows, oldest first."""
        return list(zip(self.evicted_ids, self.evicted_digests, strict=True))


def _bad_id(value: str) -> bool:
    return any(c in value for c in _ID_FORBIDDEN)


# ---------------------------------------------------------------- ring <-> state


def capture(
    ring: Ring,
    intake: Intake,
    *,
    route: str,
    key: str,
    worker: int,
    mono_now: float,
    wall_now: float,
    generation: int = 0,
    final: bool = False,
) -> RingState:
    """The ring's and intake's state now, with times on the wall clock.

    Cheap (copies of the ring's lists, sharing its bytes; about 20 ms for a
    full 16 MiB ring with a full evicted-id memory): call it where the ring
    lives. The state is immutable, so encoding it may happen in another thread.
    """
    if intake.ring is not ring:
        raise ValueError("capture: the intake feeds another ring")
    shift = wall_now - mono_now
    ids, data, times = ring.held()
    evicted_ids, evicted_digests = ring.evicted_memory()
    return RingState(
        route=route,
        key=key,
        worker=worker,
        id_prefix=intake.id_prefix,
        last_upstream_id=intake.last_upstream_id,
        first_seq=ring.first_seq,
        next_seq=ring.next_seq,
        ids=tuple(ids),
        data=tuple(data),
        walls=tuple([t + shift for t in times]),
        evicted_ids=tuple(evicted_ids),
        evicted_digests=tuple(evicted_digests),
        generation=generation,
        saved_at=wall_now,
        final=final,
    )


def restore_into(
    state: RingState, ring: Ring, intake: Intake, *, mono_now: float, wall_now: float
) -> None:
    """Fill an empty ring (and its intake) from `state`, under the same seqs.

    The ring's own bounds then apply: what no longer fits its count, bytes or
    age is evicted (and remembered as evicted) as by any append. Times go back
    to the monotonic clock, kept non-decreasing and never in the future (the
    wall clock may have stepped between the two processes). The intake gets
    the state's id prefix and last upstream id, so the next assigned id is the
    one the saved process would have given.

    Raises:
        ValueError: the ring holds events, or the intake feeds another ring.
    """
    if intake.ring is not ring:
        raise ValueError("restore_into: the intake feeds another ring")
    ring.start_at(state.first_seq)
    ring.remember_evicted(state.evicted_ids, state.evicted_digests)
    if state.ids:
        shift = mono_now - wall_now
        walls = state.walls
        if all(map(operator.le, walls, walls[1:])) and walls[-1] <= wall_now:
            times = [wall + shift for wall in walls]  # the usual case
        else:
            running = accumulate((wall + shift for wall in walls), max)
            times = [t if t < mono_now else mono_now for t in running]
        ring.restore(state.ids, state.data, times)
    ring.expire(mono_now)
    intake.id_prefix = state.id_prefix
    intake.last_upstream_id = state.last_upstream_id


# ---------------------------------------------------------------- snapshot


def _text(value: str) -> bytes:
    # surrogatepass: any str a ring holds round-trips, even one no parser makes.
    return value.encode("utf-8", "surrogatepass")


def _u32s(values: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(values)}I", *values)


def _id_column(ids: Sequence[str]) -> bytes:
    """A column of ids: its byte length (u64), then the ids in UTF-8, each
    ended by LF. An SSE line ends at LF, so no id a stream carries holds one.

    Raises:
        ValueError: one does (a state not made from a ring fed by an Intake).
    """
    if not ids:
        return _U64.pack(0)
    joined = "\n".join(ids) + "\n"
    if joined.count("\n") != len(ids):
        raise ValueError("an id holds LF: it can't be stored")
    raw = _text(joined)
    return _U64.pack(len(raw)) + raw


def encode_snapshot(state: RingState) -> bytes:
    """The snapshot file for `state`: see docs/state-format.md.

    Columns rather than rows (all the lengths, then all the times, then all
    the ids, then the bytes), so that it is made of a few C-level joins and
    packs whatever the number of events: pure, and thread-safe on a captured
    state.
    """
    parts: list[bytes] = []
    for value in (state.route, state.key, state.id_prefix, state.last_upstream_id):
        raw = _text(value)
        parts += (_U32.pack(len(raw)), raw)
    walls = struct.pack(f"<{len(state.walls)}d", *state.walls)
    parts += (_u32s(list(map(len, state.data))), walls, _id_column(state.ids))
    parts += state.data
    parts += (_u32s(state.evicted_digests), _id_column(state.evicted_ids))
    body = b"".join(parts)
    head = _SNAP_FIXED.pack(
        SNAPSHOT_MAGIC,
        VERSION,
        FLAG_FINAL if state.final else 0,
        _SNAP_FIXED.size + len(body) + _U32.size,  # the whole file's length
        state.generation,
        state.worker,
        state.saved_at,
        state.first_seq,
        state.next_seq,
        len(state.ids),
        len(state.evicted_ids),
    )
    return b"".join((head, body, _U32.pack(crc32(body, crc32(head)))))


def _preamble(data: bytes, magic: bytes, what: str) -> None:
    """Refuse what is not `what` of this version, most telling reason first."""
    if not data:
        raise BadState("empty file")
    if data[: len(magic)] != magic[: len(data)]:
        raise BadState(f"not a ssefan {what} (bad magic)")
    if len(data) < _PREAMBLE.size:
        raise BadState(f"truncated: {len(data)} bytes, shorter than a {what} header")
    version = _PREAMBLE.unpack_from(data)[1]
    if version != VERSION:
        raise BadState(f"unsupported version {version} (this ssefan reads version {VERSION})")


class _Cursor:
    """Reads a file's fields in order; running out is a BadState, never an IndexError."""

    __slots__ = ("data", "end", "limit", "off")

    def __init__(self, data: bytes, off: int, end: int, limit: int) -> None:
        self.data, self.off, self.end, self.limit = data, off, end, limit

    def take(self, n: int, what: str) -> bytes:
        if n > self.limit:
            raise BadState(f"{what}: length {n} over the limit of {self.limit} bytes")
        off = self.off
        if off + n > self.end:
            raise BadState(f"{what} runs past the end at offset {off}")
        self.off = off + n
        return self.data[off : off + n]

    def unpack(self, shape: struct.Struct, what: str) -> tuple[Any, ...]:
        off = self.off
        if off + shape.size > self.end:
            raise BadState(f"{what} runs past the end at offset {off}")
        self.off = off + shape.size
        return shape.unpack_from(self.data, off)

    def text(self, what: str) -> str:
        (n,) = self.unpack(_U32, what)
        return _decode_text(self.take(n, what), what)

    def column(self, kind: str, count: int, what: str) -> tuple[Any, ...]:
        """`count` values of struct format `kind`, if the file has room for them
        (so a damaged count allocates nothing the file does not back)."""
        size = count * struct.calcsize(kind)
        if self.off + size > self.end:
            raise BadState(f"{what} run past the end at offset {self.off}")
        values = struct.unpack_from(f"<{count}{kind}", self.data, self.off)
        self.off += size
        return values

    def run(self, lengths: Sequence[int], what: str) -> list[bytes]:
        """Byte strings of these lengths, end to end, each within the limit."""
        if lengths and max(lengths) > self.limit:
            n = max(range(len(lengths)), key=lengths.__getitem__)
            raise BadState(f"{what} {n}: length {lengths[n]} over the limit of {self.limit} bytes")
        start, total = self.off, sum(lengths)
        if start + total > self.end:
            raise BadState(f"{what}s run past the end at offset {start}")
        self.off = start + total
        data = self.data
        return [data[a:b] for a, b in pairwise(accumulate(lengths, initial=start))]

    def ids(self, count: int, what: str) -> list[str]:
        """A column of `count` ids (see _id_column): one decode and one split."""
        (size,) = self.unpack(_U64, f"{what} column")
        if self.off + size > self.end:
            raise BadState(f"{what} column runs past the end at offset {self.off}")
        text = _decode_text(self.data[self.off : self.off + size], f"{what} column")
        self.off += size
        ids = text.split("\n")
        if ids.pop():  # each id ends with LF, so the split ends with ""
            raise BadState(f"{what} column does not end with LF")
        if len(ids) != count:
            raise BadState(f"{what} column holds {len(ids)} ids, not {count}")
        return ids


def _decode_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise BadState(f"{what} is not UTF-8") from None


def _check_identity(
    kind: str, route: str, key: str, worker: int, expect: tuple[str, str, int]
) -> None:
    if route != expect[0]:
        raise BadState(f"{kind} of route {route!r}, not {expect[0]!r}")
    if key != expect[1]:
        raise BadState(f"{kind} of key {key!r} of route {route!r}, not {expect[1]!r}")
    if worker != expect[2]:
        raise BadState(f"{kind} of worker {worker}, not {expect[2]}")


def decode_snapshot(
    data: bytes,
    *,
    expect_route: str,
    expect_key: str,
    expect_worker: int,
    max_record_bytes: int,
) -> RingState:
    """The state in a snapshot file, checked whole before any of it is believed.

    Raises:
        BadState: anything wrong, with the reason (truncated, bad magic,
            unsupported version, checksum mismatch, another channel's, a
            record over `max_record_bytes`, an inconsistent count...).
    """
    _preamble(data, SNAPSHOT_MAGIC, "snapshot")
    if len(data) < _SNAP_FIXED.size + _U32.size:
        raise BadState(f"truncated: {len(data)} bytes, shorter than a snapshot header")
    (_, _, flags, total, generation, worker, saved_at, first, next_, count, n_evicted) = (
        _SNAP_FIXED.unpack_from(data)
    )
    if len(data) < total:
        raise BadState(f"truncated: {len(data)} of {total} bytes")
    if len(data) > total:
        raise BadState(f"{len(data) - total} bytes past the end of the snapshot ({total} bytes)")
    end = total - _U32.size
    if crc32(memoryview(data)[:end]) != _U32.unpack_from(data, end)[0]:
        raise BadState("checksum mismatch")
    if flags & ~FLAG_FINAL:
        raise BadState(f"unknown flags {flags:#06x}")
    cur = _Cursor(data, _SNAP_FIXED.size, end, max_record_bytes)
    route, key = cur.text("route"), cur.text("key")
    _check_identity("snapshot", route, key, worker, (expect_route, expect_key, expect_worker))
    id_prefix, last_upstream_id = cur.text("id prefix"), cur.text("last upstream id")
    if not first <= next_ <= MAX_SEQ or count != next_ - first:
        raise BadState(f"{count} events do not fill seqs {first}..{next_}")
    # Columns are sized by counts from the file, but a count is first held
    # against the bytes left, so the file's own size bounds what is
    # allocated, and each event's length is held against the limit.
    data_lengths = cur.column("I", count, "event lengths")
    walls = cur.column("d", count, "event times")
    if not all(map(math.isfinite, walls)):
        n = next(i for i, wall in enumerate(walls) if not math.isfinite(wall))
        raise BadState(f"event {first + n}: time {walls[n]!r} is not a time")
    ids = cur.ids(count, "event id")
    datas = cur.run(data_lengths, "event")
    digests = cur.column("I", n_evicted, "evicted digests")
    evicted_ids = cur.ids(n_evicted, "evicted id")
    if cur.off != end:
        raise BadState(f"{end - cur.off} unexpected bytes before the checksum")
    try:
        return RingState(
            route=route,
            key=key,
            worker=worker,
            id_prefix=id_prefix,
            last_upstream_id=last_upstream_id,
            first_seq=first,
            next_seq=next_,
            ids=tuple(ids),
            data=tuple(datas),
            walls=walls,
            evicted_ids=tuple(evicted_ids),
            evicted_digests=digests,
            generation=generation,
            saved_at=saved_at,
            final=bool(flags & FLAG_FINAL),
        )
    except ValueError as e:
        raise BadState(str(e)) from None


def peek_identity(head: bytes) -> ChannelId:
    """Whose file this is, from its first bytes (a snapshot or a journal),
    without reading or checking the rest: for listing files no channel owns.

    Raises:
        BadState: not a state file of this version, or too short to tell.
    """
    if head[: len(JOURNAL_MAGIC)] == JOURNAL_MAGIC[: len(head)] and head:
        header, _ = _journal_header(head, max_record_bytes=len(head))
        route, key, worker = header.route, header.key, header.worker
    else:
        _preamble(head, SNAPSHOT_MAGIC, "snapshot")
        if len(head) < _SNAP_FIXED.size:
            raise BadState(f"truncated: {len(head)} bytes, shorter than a snapshot header")
        worker = int(_SNAP_FIXED.unpack_from(head)[5])
        cur = _Cursor(head, _SNAP_FIXED.size, len(head), len(head))
        route, key = cur.text("route"), cur.text("key")
    try:
        return ChannelId(route, key, worker)
    except ValueError as e:
        raise BadState(str(e)) from None


# ---------------------------------------------------------------- journal


@dataclass(frozen=True, slots=True)
class JournalHeader:
    route: str
    key: str
    worker: int
    generation: int  # of the snapshot this journal follows (0: none)
    start_seq: int  # the ring's next seq when the journal began
    id_prefix: str


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One ring append."""

    seq: int
    wall: float
    id: str
    data: bytes


@dataclass(frozen=True, slots=True)
class MarkRecord:
    """The intake's last upstream id moved."""

    last_upstream_id: str


@dataclass(frozen=True, slots=True)
class JournalRead:
    """What a journal file held up to its first unreadable record.

    `good_length` is where the good records end: truncate the file there
    before appending again. `problem` is None when the file ended cleanly
    after a record; otherwise it says what stopped the reading and at which
    offset. `torn` is True when that was an unfinished last record (the
    normal result of a crash during a write), False for damage.
    """

    header: JournalHeader
    records: list[EventRecord | MarkRecord]
    good_length: int
    problem: str | None = None
    torn: bool = False


def journal_header(
    *, route: str, key: str, worker: int, generation: int, start_seq: int, id_prefix: str
) -> bytes:
    """The first bytes of a journal that follows snapshot `generation` and
    whose first event will be `start_seq`."""
    if not 0 <= start_seq <= MAX_SEQ or not 0 <= generation <= MAX_SEQ:
        raise ValueError(f"start seq {start_seq} or generation {generation} out of range")
    strings = b"".join(_U32.pack(len(raw)) + raw for raw in map(_text, (route, key, id_prefix)))
    length = _JRNL_FIXED.size + len(strings) + _U32.size
    head = (
        _JRNL_FIXED.pack(JOURNAL_MAGIC, VERSION, 0, length, generation, worker, start_seq) + strings
    )
    return head + _U32.pack(crc32(head))


def journal_event(seq: int, wall: float, event_id: str, data: bytes) -> bytes:
    """The record of one ring append (`data`: the encoded event).

    Raises:
        ValueError: the id holds LF (no id an SSE stream carries can).
    """
    if "\n" in event_id:
        raise ValueError("an id holds LF: it can't be stored")
    raw = _text(event_id)
    head = _EVENT_HEAD.pack(EVENT, seq, wall, len(raw))
    digest = crc32(data, crc32(raw, crc32(head)))
    return b"".join((_REC_HEAD.pack(len(head) + len(raw) + len(data), digest), head, raw, data))


def journal_mark(last_upstream_id: str) -> bytes:
    """The record of the intake's last upstream id moving to `last_upstream_id`."""
    payload = bytes((MARK,)) + _text(last_upstream_id)
    return _REC_HEAD.pack(len(payload), crc32(payload)) + payload


def _journal_header(data: bytes, *, max_record_bytes: int) -> tuple[JournalHeader, int]:
    _preamble(data, JOURNAL_MAGIC, "journal")
    if len(data) < _JRNL_FIXED.size:
        raise BadState(f"truncated: {len(data)} bytes, shorter than a journal header")
    _, _, flags, length, generation, worker, start_seq = _JRNL_FIXED.unpack_from(data)
    if length > max_record_bytes:
        raise BadState(f"header length {length} over the limit of {max_record_bytes} bytes")
    if len(data) < length:
        raise BadState(f"truncated: {len(data)} bytes, the header alone is {length}")
    if length < _JRNL_FIXED.size + _U32.size:
        raise BadState(f"header length {length} too short for a header")
    end = length - _U32.size
    if crc32(memoryview(data)[:end]) != _U32.unpack_from(data, end)[0]:
        raise BadState("header checksum mismatch")
    if flags:
        raise BadState(f"unknown flags {flags:#06x}")
    if start_seq > MAX_SEQ or generation > MAX_SEQ:
        raise BadState(f"start seq {start_seq} or generation {generation} out of range")
    cur = _Cursor(data, _JRNL_FIXED.size, end, max_record_bytes)
    route, key, id_prefix = cur.text("route"), cur.text("key"), cur.text("id prefix")
    if cur.off != end:
        raise BadState(f"{end - cur.off} unexpected bytes in the header")
    if not resumable_id(f"{id_prefix}0") or _bad_id(id_prefix):
        raise BadState(f"id prefix {id_prefix!r} cannot start a resumable id")
    if "\0" in route or "\0" in key:
        raise BadState(f"a channel identity holds NUL: {route!r}, {key!r}")
    return JournalHeader(route, key, worker, generation, start_seq, id_prefix), length


def decode_journal_header(
    data: bytes,
    *,
    expect_route: str,
    expect_key: str,
    expect_worker: int,
    max_record_bytes: int,
) -> tuple[JournalHeader, int]:
    """A journal's header and its length in bytes (where records begin).

    Raises:
        BadState: not a usable journal of this channel.
    """
    header, length = _journal_header(data, max_record_bytes=max_record_bytes)
    _check_identity(
        "journal",
        header.route,
        header.key,
        header.worker,
        (expect_route, expect_key, expect_worker),
    )
    return header, length


def decode_journal(
    data: bytes,
    *,
    expect_route: str,
    expect_key: str,
    expect_worker: int,
    max_record_bytes: int,
) -> JournalRead:
    """Every good record of a journal file, and where they end.

    Reads until the end of `data`, an unfinished record (torn tail), a length
    of 0 or over `max_record_bytes` (checked before the payload is sliced), a
    CRC mismatch, or a payload that is not a record of this version.

    Raises:
        BadState: the header is not usable (nothing in the file can be trusted).
    """
    header, off = decode_journal_header(
        data,
        expect_route=expect_route,
        expect_key=expect_key,
        expect_worker=expect_worker,
        max_record_bytes=max_record_bytes,
    )
    records: list[EventRecord | MarkRecord] = []
    n = len(data)
    rec_head, event_head = _REC_HEAD.size, _EVENT_HEAD.size
    problem: str | None = None
    torn = False
    while off < n:
        if n - off < rec_head:
            problem, torn = f"torn tail at offset {off}: {n - off} bytes of a record head", True
            break
        length, digest = _REC_HEAD.unpack_from(data, off)
        if length == 0:
            # A zeroed tail (a power cut after the file grew) reads as length 0.
            problem = f"empty record at offset {off} (zeroed tail?)"
            break
        if length > max_record_bytes:
            problem = (
                f"record at offset {off}: length {length} over the limit of {max_record_bytes}"
            )
            break
        start = off + rec_head
        if start + length > n:
            problem = f"torn tail at offset {off}: {n - start} of {length} bytes of a record"
            torn = True
            break
        payload = data[start : start + length]
        if crc32(payload) != digest:
            problem = f"record at offset {off}: checksum mismatch"
            break
        kind = payload[0]
        if kind == EVENT:
            event = _event_record(payload) if length >= event_head else None
            if event is None:
                problem = f"record at offset {off}: malformed event"
                break
            records.append(event)
        elif kind == MARK:
            last = _try_text(payload[1:])
            if last is None or _bad_id(last):
                problem = f"record at offset {off}: malformed mark"
                break
            records.append(MarkRecord(last))
        else:
            problem = f"record at offset {off}: unknown type {kind}"
            break
        off = start + length
    return JournalRead(header, records, off, problem, torn)


def _event_record(payload: bytes) -> EventRecord | None:
    _, seq, wall, id_len = _EVENT_HEAD.unpack_from(payload)
    id_end = _EVENT_HEAD.size + id_len
    if id_end > len(payload) or seq >= MAX_SEQ or not math.isfinite(wall):  # seq + 1 fits
        return None
    event_id = _try_text(payload[_EVENT_HEAD.size : id_end])
    if event_id is None or "\n" in event_id:
        return None
    return EventRecord(seq, wall, event_id, payload[id_end:])


def _try_text(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def apply_journal(state: RingState | None, journal: JournalRead) -> RingState:
    """`state` (a snapshot's, or None) with a journal's records applied.

    A journal older than the snapshot (a lower generation) changes nothing.
    Otherwise MARKs set the last upstream id, an EVENT below the next seq is
    skipped (the state has it), and one above it (or a journal that starts
    above it) starts the ring again at its seq, the events held so far
    becoming evicted ids. The journal's id prefix is the newer one. The
    result is never `final`: events may have been handed out after the
    journal's last flushed record.

    Raises:
        ValueError: the journal belongs to another channel than `state`.
    """
    header = journal.header
    if state is None:
        state = RingState(
            route=header.route,
            key=header.key,
            worker=header.worker,
            id_prefix=header.id_prefix,
            last_upstream_id="",
            first_seq=header.start_seq,
            next_seq=header.start_seq,
            generation=header.generation,
        )
    elif (header.route, header.key, header.worker) != (state.route, state.key, state.worker):
        raise ValueError("apply_journal: the journal is another channel's")
    elif header.generation < state.generation:
        return state
    ids, data, walls = list(state.ids), list(state.data), list(state.walls)
    evicted_ids, evicted_digests = list(state.evicted_ids), list(state.evicted_digests)
    first, next_ = state.first_seq, state.next_seq
    last_upstream_id = state.last_upstream_id

    def restart(seq: int) -> None:
        nonlocal first, next_
        for event_id, raw in zip(ids, data, strict=True):
            if event_id:
                evicted_ids.append(event_id)
                evicted_digests.append(crc32(raw))
        for column in (ids, data, walls):
            column.clear()
        first = next_ = seq

    if header.start_seq > next_:
        restart(header.start_seq)
    for record in journal.records:
        if isinstance(record, MarkRecord):
            last_upstream_id = record.last_upstream_id
            continue
        if record.seq < next_:
            continue
        if record.seq > next_:
            restart(record.seq)
        ids.append(record.id)
        data.append(record.data)
        walls.append(record.wall)
        next_ += 1
    return replace(
        state,
        id_prefix=header.id_prefix,
        last_upstream_id=last_upstream_id,
        first_seq=first,
        next_seq=next_,
        ids=tuple(ids),
        data=tuple(data),
        walls=tuple(walls),
        evicted_ids=tuple(evicted_ids),
        evicted_digests=tuple(evicted_digests),
        generation=max(state.generation, header.generation),
        final=False,
    )
