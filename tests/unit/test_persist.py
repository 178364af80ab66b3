"""core.persist without files: the snapshot and journal formats, fed whole,
cut at every byte and flipped at every bit; capture and restore of a live ring."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from collections.abc import Sequence
from typing import Any
from zlib import crc32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssefan.core.fanout import Intake
from ssefan.core.persist import (
    VERSION,
    BadState,
    ChannelId,
    EventRecord,
    JournalRead,
    MarkRecord,
    RingState,
    apply_journal,
    capture,
    decode_journal,
    decode_snapshot,
    encode_snapshot,
    journal_event,
    journal_header,
    journal_mark,
    peek_identity,
    record_limit,
    restore_into,
)
from ssefan.core.ring import Ring
from ssefan.core.sse import Event, IdOnly, Overflow, Parser, encode

ROUTE, KEY, WORKER = "/events/{room}", "lobby", 2
LIMIT = 1 << 20
MONO, WALL = 100.0, 1_700_000_000.0  # "now" in the saving process


def ring(max_events: int = 100, max_bytes: int = 1 << 20, max_age: float = 0) -> Ring:
    return Ring(max_events=max_events, max_bytes=max_bytes, max_age=max_age)


def fed(n: int, *, max_events: int = 100, prefix: str = "p-") -> Intake:
    """An intake whose ring got `n` events at MONO - n + i: app ids, and every
    third one without an id (so ssefan assigned one)."""
    intake = Intake(ring(max_events), prefix)
    for i in range(n):
        item = Event(f"payload {i}", id=str(i) if i % 3 else None)
        intake.accept([item], now=MONO - n + i)
    return intake


def snap(intake: Intake, **kw: object) -> RingState:
    args: dict[str, object] = {"route": ROUTE, "key": KEY, "worker": WORKER}
    args.update(kw)
    return capture(intake.ring, intake, mono_now=MONO, wall_now=WALL, **args)  # type: ignore[arg-type]


def decode(
    data: bytes, *, limit: int = LIMIT, route: str = ROUTE, worker: int = WORKER
) -> RingState:
    return decode_snapshot(
        data, expect_route=route, expect_key=KEY, expect_worker=worker, max_record_bytes=limit
    )


def state_of(
    *,
    events: Sequence[tuple[str, bytes, float]] = (),
    evicted: Sequence[tuple[str, int]] = (),
    **fields: Any,
) -> RingState:
    """A RingState from rows (the tables below read better that way)."""
    args: dict[str, Any] = {
        "route": ROUTE,
        "key": KEY,
        "worker": WORKER,
        "id_prefix": "p-",
        "last_upstream_id": "",
        "first_seq": 0,
    }
    args.update(fields)
    args.setdefault("next_seq", args["first_seq"] + len(events))
    return RingState(
        **args,
        ids=tuple(e[0] for e in events),
        data=tuple(e[1] for e in events),
        walls=tuple(e[2] for e in events),
        evicted_ids=tuple(e[0] for e in evicted),
        evicted_digests=tuple(e[1] for e in evicted),
    )


def contents(r: Ring) -> list[tuple[int, str, bytes]]:
    return [(s, r.id_at(s), r.join(s, s + 1)) for s in range(r.first_seq, r.next_seq)]


def resealed(data: bytes | bytearray) -> bytes:
    """`data` with its trailing CRC made right again: damage the checksum can't see."""
    body = bytes(data[:-4])
    return body + struct.pack("<I", crc32(body))


# ---------------------------------------------------------------- snapshot


def odd_state() -> RingState:
    """Ids and data no parser would make, to show the format doesn't care."""
    every_byte = bytes(range(256))
    return state_of(
        route="/ünï/{k}",
        key="clé 𝄞",
        worker=7,
        id_prefix="préfixe-",
        last_upstream_id="dernière ✓",
        first_seq=2**40,
        events=(("é✓𝄞", every_byte, WALL), ("", every_byte * 3, WALL + 0.5), ("\ud800", b"", WALL)),
        evicted=(("ancien ☃", 0xFFFFFFFF), ("", 0)),
        generation=2**62,
        saved_at=WALL + 1,
        final=True,
    )


@pytest.mark.parametrize(
    "state",
    [
        pytest.param(snap(fed(0)), id="empty-ring"),
        pytest.param(snap(fed(5)), id="some"),
        pytest.param(snap(fed(30, max_events=8)), id="wrapped-with-evicted-memory"),
        pytest.param(snap(fed(3), final=True, generation=9), id="final"),
        pytest.param(odd_state(), id="non-ascii-and-every-byte"),
    ],
)
def test_a_snapshot_decodes_to_the_state_it_was_made_of(state: RingState) -> None:
    data = encode_snapshot(state)
    got = decode_snapshot(
        data,
        expect_route=state.route,
        expect_key=state.key,
        expect_worker=state.worker,
        max_record_bytes=LIMIT,
    )
    assert got == state


def test_capture_holds_the_ring_the_intake_and_wall_clock_times() -> None:
    intake = fed(30, max_events=8)
    intake.last_upstream_id = "29"
    state = snap(intake)
    assert (state.first_seq, state.next_seq) == (22, 30)
    assert list(state.ids) == [intake.ring.id_at(s) for s in range(22, 30)]
    assert state.data == tuple(intake.ring.held()[1])
    assert state.walls[-1] == WALL - 1  # stamped MONO - 1
    assert (list(state.evicted_ids), list(state.evicted_digests)) == intake.ring.evicted_memory()
    assert state.evicted_ids[:4] == ("p-0", "1", "2", "p-3")
    assert len(state.evicted) == 22
    assert (state.id_prefix, state.last_upstream_id) == ("p-", "29")


def test_after_a_restore_seqs_ids_and_the_id_prefix_continue() -> None:
    before = fed(30, max_events=8)
    data = encode_snapshot(snap(before))
    after = Intake(ring(8), "new-prefix-")
    restore_into(decode(data), after.ring, after, mono_now=5.0, wall_now=WALL + 60)
    assert contents(after.ring) == contents(before.ring)
    assert after.next_assigned_id() == before.next_assigned_id() == "p-30"
    # The same read then makes the same event under the same seq and id.
    got = [x.accept([Event("no id")], now=6.0).events for x in (before, after)]
    assert got[0] == got[1] == [encode(Event("no id", id="p-30"))]
    assert after.ring.next_seq == before.ring.next_seq == 31
    # Evicted ids stay evicted (not unknown), with their digests.
    assert after.ring.was_evicted("1")
    assert after.ring.holds_copy("1", encode(Event("payload 1", id="1")))


def test_a_restore_into_smaller_bounds_evicts_the_oldest_and_remembers_them() -> None:
    state = snap(fed(10))
    small = Intake(ring(3), "x-")
    restore_into(state, small.ring, small, mono_now=MONO, wall_now=WALL)
    assert (small.ring.first_seq, small.ring.next_seq) == (7, 10)
    assert small.ring.was_evicted("5")
    assert small.ring.seq_of("8") == 8


def test_restored_times_are_monotonic_and_the_age_bound_applies() -> None:
    state = snap(fed(10))  # stamped WALL-10 .. WALL-1
    later = Intake(ring(max_age=5.0), "x-")
    # Restored 3 s after the save, in a process whose monotonic clock reads 50.
    restore_into(state, later.ring, later, mono_now=50.0, wall_now=WALL + 3)
    assert later.ring.time_at(later.ring.next_seq - 1) == 50.0 - 4
    assert later.ring.first_seq == 8  # seqs 0..7 were stamped more than 5 s before 50


def test_times_out_of_order_or_in_the_future_are_clamped() -> None:
    state = state_of(events=[("a", b"1", WALL), ("b", b"2", WALL - 30), ("c", b"3", WALL + 999)])
    into = Intake(ring(), "x-")
    restore_into(state, into.ring, into, mono_now=10.0, wall_now=WALL)
    assert [into.ring.time_at(s) for s in range(3)] == [10.0, 10.0, 10.0]


def test_restore_needs_an_empty_ring_fed_by_the_intake() -> None:
    state = snap(fed(2))
    full = fed(1)
    with pytest.raises(ValueError, match="holding 1 events"):
        restore_into(state, full.ring, full, mono_now=MONO, wall_now=WALL)
    with pytest.raises(ValueError, match="another ring"):
        restore_into(state, ring(), full, mono_now=MONO, wall_now=WALL)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        pytest.param({"next_seq": 1}, "0 ids, 0 events and 0 times for seqs 0..1", id="count"),
        pytest.param({"evicted_ids": ("a",)}, "1 evicted ids, 0 digests", id="evicted"),
        pytest.param({"first_seq": 2, "next_seq": 1}, "out of order", id="order"),
        pytest.param({"id_prefix": "a\nb"}, "resumable", id="prefix-lf"),
        pytest.param({"id_prefix": " lead"}, "resumable", id="prefix-space"),
        pytest.param({"last_upstream_id": "a\0"}, "CR, LF or NUL", id="last-nul"),
        pytest.param({"worker": -1}, "worker", id="worker"),
    ],
)
def test_a_ring_state_refuses_what_could_not_be_restored(
    fields: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {
        "route": ROUTE,
        "key": KEY,
        "worker": WORKER,
        "id_prefix": "p-",
        "last_upstream_id": "",
        "first_seq": 0,
        "next_seq": 0,
    }
    args.update(fields)
    with pytest.raises(ValueError, match=match):
        RingState(**args)  # type: ignore[arg-type]


SMALL = encode_snapshot(snap(fed(4, max_events=3)))


def test_a_snapshot_cut_at_any_byte_is_bad_state() -> None:
    reasons = set()
    for n in range(len(SMALL)):
        with pytest.raises(BadState) as caught:
            decode(SMALL[:n])
        reasons.add(caught.value.reason.split(":")[0].split(" (")[0])
    assert reasons == {"empty file", "truncated"}


def test_any_flipped_bit_is_bad_state_and_past_the_header_a_checksum_mismatch() -> None:
    for bit in range(len(SMALL) * 8):
        damaged = bytearray(SMALL)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BadState) as caught:
            decode(bytes(damaged))
        if bit // 8 >= 68:  # past the fixed header: the length is right, the sum is not
            assert caught.value.reason == "checksum mismatch", bit


def with_header(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(data)
    struct.pack_into(fmt, patched, offset, value)
    return resealed(patched)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty file", id="empty"),
        pytest.param(b"\x89SSEjrnl" + SMALL[8:], "not a ssefan snapshot (bad magic)", id="journal"),
        pytest.param(b"{}", "not a ssefan snapshot (bad magic)", id="json"),
        pytest.param(
            SMALL[:8] + b"\x02\x00" + SMALL[10:],
            "unsupported version 2 (this ssefan reads version 1)",
            id="version",
        ),
        pytest.param(SMALL + b"\0", "1 bytes past the end of the snapshot", id="trailing"),
        pytest.param(SMALL[:-1], f"truncated: {len(SMALL) - 1} of {len(SMALL)} bytes", id="cut"),
        pytest.param(SMALL[:-4] + bytes(4), "checksum mismatch", id="checksum"),
        pytest.param(with_header(SMALL, 10, "<H", 2), "unknown flags 0x0002", id="flags"),
        pytest.param(
            with_header(SMALL, 56, "<Q", 2**40),
            "1099511627776 events do not fill seqs 1..4",
            id="count",
        ),
        pytest.param(
            resealed(SMALL.replace(b"/events", b"\xffevents", 1)),
            "route is not UTF-8",
            id="not-utf8",
        ),
        pytest.param(
            with_header(resealed(SMALL[:-4] + b"junk" + SMALL[-4:]), 12, "<Q", len(SMALL) + 4),
            "4 unexpected bytes before the checksum",
            id="junk",
        ),
        pytest.param(
            resealed(SMALL.replace(b"1\n2\np-3\n", b"1\n2\np\n3\n")),
            "event id column holds 4 ids, not 3",
            id="id-count",
        ),
        pytest.param(
            resealed(SMALL.replace(b"1\n2\np-3\n", b"1\n2\np-3x", 1)),
            "event id column does not end with LF",
            id="id-end",
        ),
        pytest.param(
            with_header(SMALL, 64, "<I", 2**31),
            "evicted digests run past the end",
            id="evicted-count",
        ),
    ],
)
def test_bad_snapshots_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(BadState) as caught:
        decode(data)
    assert reason in caught.value.reason


@pytest.mark.parametrize(
    ("route", "worker", "reason"),
    [
        pytest.param(
            "/other", WORKER, "snapshot of route '/events/{room}', not '/other'", id="route"
        ),
        pytest.param(ROUTE, 0, "snapshot of worker 2, not 0", id="worker"),
    ],
)
def test_a_snapshot_of_another_channel_is_refused(route: str, worker: int, reason: str) -> None:
    with pytest.raises(BadState, match="^" + reason.replace("{", r"\{").replace("}", r"\}") + "$"):
        decode(SMALL, route=route, worker=worker)
    with pytest.raises(BadState, match="of key 'lobby'"):
        decode_snapshot(
            SMALL,
            expect_route=ROUTE,
            expect_key="hall",
            expect_worker=WORKER,
            max_record_bytes=LIMIT,
        )


def test_a_record_over_the_limit_is_refused() -> None:
    with pytest.raises(BadState, match="over the limit of 16 bytes"):
        decode(SMALL, limit=16)


def test_a_bad_id_prefix_under_a_good_checksum_is_refused() -> None:
    data = SMALL.replace(b"p-", b"p\n", 1)
    with pytest.raises(BadState, match="cannot start a resumable id"):
        decode(resealed(data))


def test_a_damaged_count_or_length_allocates_nothing_like_it() -> None:
    huge = with_header(with_header(SMALL, 56, "<Q", 2**40), 48, "<Q", 2**40 + 1)
    tracemalloc.start()
    try:
        with pytest.raises(BadState) as caught:
            decode(huge, limit=2**62)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024
    assert caught.value.reason == "event lengths run past the end at offset 106"


NO_LF = st.text().filter(lambda s: "\n" not in s)


@settings(max_examples=100)
@given(
    events=st.lists(
        st.tuples(NO_LF, st.binary(), st.floats(allow_nan=False, allow_infinity=False))
    ),
    evicted=st.lists(st.tuples(NO_LF, st.integers(0, 2**32 - 1))),
    first=st.integers(0, 2**62),
    last=st.text().filter(lambda s: not any(c in s for c in "\r\n\0")),
)
def test_any_state_round_trips(
    events: list[tuple[str, bytes, float]], evicted: list[tuple[str, int]], first: int, last: str
) -> None:
    state = state_of(events=events, evicted=evicted, first_seq=first, last_upstream_id=last)
    assert decode(encode_snapshot(state)) == state


def test_an_id_with_lf_is_not_stored() -> None:
    with pytest.raises(ValueError, match="an id holds LF"):
        encode_snapshot(state_of(events=[("a\nb", b"", WALL)]))
    with pytest.raises(ValueError, match="an id holds LF"):
        encode_snapshot(state_of(evicted=[("a\n", 0)]))
    with pytest.raises(ValueError, match="an id holds LF"):
        journal_event(0, WALL, "a\nb", b"")


# ---------------------------------------------------------------- journal


def header(start_seq: int = 10, generation: int = 3, prefix: str = "p-") -> bytes:
    return journal_header(
        route=ROUTE,
        key=KEY,
        worker=WORKER,
        generation=generation,
        start_seq=start_seq,
        id_prefix=prefix,
    )


def read(data: bytes, *, limit: int = LIMIT) -> JournalRead:
    return decode_journal(
        data, expect_route=ROUTE, expect_key=KEY, expect_worker=WORKER, max_record_bytes=limit
    )


RECORDS: list[EventRecord | MarkRecord] = [
    EventRecord(10, WALL, "10", b"id: 10\ndata: a\n\n"),
    MarkRecord("10"),
    EventRecord(11, WALL + 1, "p-11", bytes(range(256))),
    EventRecord(12, WALL + 2, "é✓𝄞", "data: ☃\n\n".encode()),
    MarkRecord("é✓𝄞"),
    MarkRecord(""),
]


def encoded(records: list[EventRecord | MarkRecord]) -> list[bytes]:
    return [
        journal_event(r.seq, r.wall, r.id, r.data)
        if isinstance(r, EventRecord)
        else journal_mark(r.last_upstream_id)
        for r in records
    ]


JOURNAL = header() + b"".join(encoded(RECORDS))


def test_a_journal_decodes_to_its_header_and_records() -> None:
    got = read(JOURNAL)
    assert (got.records, got.good_length, got.problem, got.torn) == (
        RECORDS,
        len(JOURNAL),
        None,
        False,
    )
    assert (got.header.route, got.header.key, got.header.worker) == (ROUTE, KEY, WORKER)
    assert (got.header.generation, got.header.start_seq, got.header.id_prefix) == (3, 10, "p-")


def test_a_journal_cut_at_any_byte_keeps_every_whole_record_before_the_cut() -> None:
    ends = [len(header())]
    for record in encoded(RECORDS):
        ends.append(ends[-1] + len(record))
    for n in range(len(header()), len(JOURNAL) + 1):
        got = read(JOURNAL[:n])
        whole = max(i for i, end in enumerate(ends) if end <= n)
        assert got.records == RECORDS[:whole], n
        assert got.good_length == ends[whole]
        if n == ends[whole]:
            assert (got.problem, got.torn) == (None, False)
        else:
            assert got.torn and got.problem is not None
            assert got.problem.startswith(f"torn tail at offset {ends[whole]}: ")


def test_a_journal_whose_header_is_cut_is_bad_state() -> None:
    for n in range(len(header())):
        with pytest.raises(BadState):
            read(JOURNAL[:n])


def damaged_at(index: int, patch: bytes) -> tuple[bytes, int]:
    """JOURNAL with record `index`'s first bytes replaced; the offset of that record."""
    offset = len(header()) + sum(map(len, encoded(RECORDS)[:index]))
    return JOURNAL[:offset] + patch + JOURNAL[offset + len(patch) :], offset


def test_a_garbage_length_stops_the_reading_without_allocating_it() -> None:
    data, offset = damaged_at(2, struct.pack("<I", 2**31))
    tracemalloc.start()
    try:
        got = read(data, limit=64 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert got.records == RECORDS[:2] and got.good_length == offset and not got.torn
    assert got.problem == f"record at offset {offset}: length 2147483648 over the limit of 67108864"


@pytest.mark.parametrize(
    ("patch_fn", "problem"),
    [
        pytest.param(
            lambda rec: bytes(len(rec)), "empty record at offset {} (zeroed tail?)", id="zeros"
        ),
        pytest.param(
            lambda rec: rec[:-1] + bytes([rec[-1] ^ 1]),
            "record at offset {}: checksum mismatch",
            id="flipped-bit",
        ),
        pytest.param(
            lambda rec: _sealed_payload(b"\x07rest"),
            "record at offset {}: unknown type 7",
            id="type",
        ),
        pytest.param(
            lambda rec: _sealed_payload(b"\x01" + bytes(5)),
            "record at offset {}: malformed event",
            id="short",
        ),
        pytest.param(
            lambda rec: _sealed_payload(b"\x02\xff"),
            "record at offset {}: malformed mark",
            id="not-utf8",
        ),
        pytest.param(
            lambda rec: _sealed_payload(b"\x02a\nb"),
            "record at offset {}: malformed mark",
            id="mark-lf",
        ),
    ],
)
def test_a_damaged_record_stops_the_reading_there(patch_fn: object, problem: str) -> None:
    record = encoded(RECORDS)[2]
    data, offset = damaged_at(2, patch_fn(record))  # type: ignore[operator]
    got = read(data)
    assert got.records == RECORDS[:2] and got.good_length == offset and not got.torn
    assert got.problem == problem.format(offset)


def test_an_event_at_the_last_seq_is_malformed() -> None:
    """Its successor's seq would not fit: the state after it could not exist."""
    payload = struct.pack("<BQdI", 1, 2**63 - 1, WALL, 0)
    got = read(header() + _sealed_payload(payload))
    assert got.records == [] and got.problem is not None and "malformed event" in got.problem


def _sealed_payload(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), crc32(payload)) + payload


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "empty file", id="empty"),
        pytest.param(SMALL, "not a ssefan journal (bad magic)", id="snapshot"),
        pytest.param(
            JOURNAL[:8] + b"\x09\x00" + JOURNAL[10:], "unsupported version 9", id="version"
        ),
        pytest.param(
            JOURNAL[:20] + bytes([JOURNAL[20] ^ 1]) + JOURNAL[21:],
            "header checksum mismatch",
            id="crc",
        ),
        pytest.param(
            journal_header(
                route="/x", key=KEY, worker=WORKER, generation=0, start_seq=0, id_prefix="p-"
            ),
            "journal of route '/x', not '/events/{room}'",
            id="route",
        ),
    ],
)
def test_bad_journal_headers_say_what_is_wrong(data: bytes, reason: str) -> None:
    with pytest.raises(BadState) as caught:
        read(data)
    assert caught.value.reason.startswith(reason), caught.value.reason


def test_the_version_is_one() -> None:
    assert VERSION == 1
    assert SMALL[8:10] == JOURNAL[8:10] == b"\x01\x00"


def test_peek_identity_reads_either_kind_of_file() -> None:
    ident = ChannelId(ROUTE, KEY, WORKER)
    assert peek_identity(SMALL[:200]) == peek_identity(JOURNAL) == ident
    with pytest.raises(BadState):
        peek_identity(b"not ours")
    with pytest.raises(BadState):
        peek_identity(JOURNAL[:20])


# ---------------------------------------------------------------- journal on a snapshot


def base(n: int = 3, first: int = 7) -> RingState:
    return state_of(
        last_upstream_id="old",
        first_seq=first,
        events=[(f"e{s}", f"data {s}".encode(), WALL) for s in range(first, first + n)],
        generation=3,
        final=True,
    )


def journal_of(
    *records: EventRecord | MarkRecord, start: int = 10, generation: int = 3
) -> JournalRead:
    return read(header(start, generation, prefix="q-") + b"".join(encoded(list(records))))


def ev(seq: int) -> EventRecord:
    return EventRecord(seq, WALL + seq, f"e{seq}", f"data {seq}".encode())


def seqs_and_ids(state: RingState) -> list[tuple[int, str]]:
    return [(state.first_seq + i, event_id) for i, event_id in enumerate(state.ids)]


def test_journal_records_extend_the_snapshot() -> None:
    got = apply_journal(base(), journal_of(ev(10), MarkRecord("new"), ev(11)))
    assert seqs_and_ids(got) == [(s, f"e{s}") for s in range(7, 12)]
    assert (got.last_upstream_id, got.id_prefix, got.final, got.generation) == (
        "new",
        "q-",
        False,
        3,
    )


def test_records_the_snapshot_already_has_are_skipped() -> None:
    got = apply_journal(base(), journal_of(ev(8), ev(9), ev(10), start=8))
    assert seqs_and_ids(got) == [(s, f"e{s}") for s in range(7, 11)]


def test_a_gap_in_seqs_starts_the_ring_again_remembering_what_it_held() -> None:
    got = apply_journal(base(), journal_of(ev(10), ev(14), ev(15)))
    assert seqs_and_ids(got) == [(14, "e14"), (15, "e15")]
    assert got.evicted == [(f"e{s}", crc32(f"data {s}".encode())) for s in range(7, 11)]


def test_a_journal_starting_past_the_snapshot_is_a_gap_too() -> None:
    got = apply_journal(base(), journal_of(MarkRecord("m"), start=20))
    assert (got.first_seq, got.next_seq, got.ids, got.last_upstream_id) == (20, 20, (), "m")


def test_a_journal_older_than_the_snapshot_changes_nothing() -> None:
    state = base()
    assert apply_journal(state, journal_of(ev(10), MarkRecord("older"), generation=2)) is state


def test_a_journal_alone_starts_at_its_header() -> None:
    got = apply_journal(None, journal_of(ev(10), ev(11), MarkRecord("m")))
    assert seqs_and_ids(got) == [(10, "e10"), (11, "e11")]
    assert (got.id_prefix, got.last_upstream_id, got.generation) == ("q-", "m", 3)


def test_a_journal_of_another_channel_is_refused() -> None:
    other = RingState(
        route="/x", key="", worker=0, id_prefix="p-", last_upstream_id="", first_seq=0, next_seq=0
    )
    with pytest.raises(ValueError, match="another channel"):
        apply_journal(other, journal_of())


def test_a_snapshot_plus_the_journal_after_it_restores_the_live_ring() -> None:
    """What a channel would write: a snapshot midway, then a record per ring
    append and a mark per read; the restore equals the live ring."""
    live = fed(20, max_events=16)
    state = snap(live, generation=4)
    data = bytearray(
        journal_header(
            route=ROUTE,
            key=KEY,
            worker=WORKER,
            generation=4,
            start_seq=state.next_seq,
            id_prefix="p-",
        )
    )
    items: list[Event | IdOnly | Overflow] = [Event("x", id="20"), Event("y"), IdOnly("22")]
    for n, item in enumerate(items):
        before = live.ring.next_seq
        live.accept([item], now=MONO + n)
        for seq in range(before, live.ring.next_seq):
            data += journal_event(seq, WALL + n, live.ring.id_at(seq), live.ring.join(seq, seq + 1))
        data += journal_mark(live.last_upstream_id)
    got = apply_journal(decode(encode_snapshot(state)), read(bytes(data)))
    restored = Intake(ring(16), "zz-")
    restore_into(got, restored.ring, restored, mono_now=MONO, wall_now=WALL)
    assert contents(restored.ring) == contents(live.ring)
    assert restored.next_assigned_id() == live.next_assigned_id()
    assert restored.last_upstream_id == live.last_upstream_id == "22"
    assert restored.ring.evicted_memory() == live.ring.evicted_memory()


# ---------------------------------------------------------------- the record limit


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"data:\n" * 400, id="empty-lines"),
        pytest.param(b"data:" + b"\xff" * 1000 + b"\n", id="invalid-utf8"),
        pytest.param(b"data\n" * 500, id="bare-field-names"),
    ],
)
def test_the_largest_events_a_parser_lets_through_fit_the_record_limit(body: bytes) -> None:
    max_event, max_line = 1024, 2048
    parser = Parser(max_line_bytes=max_line, max_event_bytes=max_event)
    id_line = b"id:" + b"\xff" * (max_line - 3) + b"\n"
    event_line = b"event:" + b"\xff" * (max_line - 6) + b"\n"
    items = parser.feed(id_line + event_line + body + b"\n")
    [event] = [i for i in items if isinstance(i, Event)]
    assert event.id is not None
    data = encode(event)
    record = journal_event(2**60, WALL, event.id, data)
    assert len(record) - 8 <= record_limit(max_event, max_line)


# ---------------------------------------------------------------- damage the checksums can't see


def _damaged(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for at, value in edits:
        out[at % len(out)] = value
    return out


EDITS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8)


@settings(max_examples=300)
@given(edits=EDITS)
def test_a_snapshot_damaged_under_a_good_checksum_is_bad_state_or_a_valid_state(
    edits: list[tuple[int, int]],
) -> None:
    """What a CRC collision would let through still meets every check: the
    reader raises BadState or returns a state that passed validation."""
    damaged = _damaged(SMALL, edits)
    struct.pack_into("<8sH", damaged, 0, b"\x89SSEsnap", 1)
    struct.pack_into("<Q", damaged, 12, len(damaged))
    with contextlib.suppress(BadState):
        decode(resealed(damaged))


@settings(max_examples=300)
@given(edits=EDITS)
def test_a_damaged_journal_reads_as_its_good_records_or_bad_state(
    edits: list[tuple[int, int]],
) -> None:
    damaged = _damaged(JOURNAL, edits)
    try:
        got = read(bytes(damaged))
    except BadState:
        return
    assert got.good_length <= len(damaged)
    apply_journal(None, got)
