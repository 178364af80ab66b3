"""The replay ring in memory: bounds, id lookup, slices."""

from __future__ import annotations

from itertools import accumulate
from zlib import crc32

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssefan.core.ring import EVICTED_MEMORY_MIN, RECLAIM_TO, Ring, RingBudget


def filled(n: int, *, max_events: int = 100, max_bytes: int = 1 << 20, max_age: float = 0) -> Ring:
    ring = Ring(max_events=max_events, max_bytes=max_bytes, max_age=max_age)
    for i in range(n):
        ring.append(f"id{i}", f"e{i};".encode(), now=float(i))
    return ring


def test_append_assigns_increasing_seqs_and_indexes_ids() -> None:
    ring = filled(5)
    assert (ring.first_seq, ring.next_seq, len(ring)) == (0, 5, 5)
    assert ring.seq_of("id3") == 3
    assert ring.seq_of("nope") is None
    assert ring.join(1, 4) == b"e1;e2;e3;"
    assert (ring.oldest_id, ring.newest_id) == ("id0", "id4")


def test_count_bound_evicts_oldest_and_remembers_evicted_ids() -> None:
    ring = filled(12, max_events=10)
    assert (ring.first_seq, ring.next_seq) == (2, 12)
    assert ring.seq_of("id1") is None
    assert ring.was_evicted("id1")
    assert not ring.was_evicted("id5")
    assert ring.join(ring.first_seq, ring.next_seq) == b"".join(
        f"e{i};".encode() for i in range(2, 12)
    )


def test_byte_bound_keeps_held_bytes_under_limit_but_never_drops_newest() -> None:
    ring = Ring(max_events=100, max_bytes=10, max_age=0)
    for i in range(5):
        ring.append(str(i), b"abcd", now=0)
    assert ring.held_bytes <= 10
    assert ring.newest_id == "4"
    ring.append("big", b"x" * 50, now=0)
    assert len(ring) == 1 and ring.newest_id == "big"


def test_age_bound_expires_old_events() -> None:
    ring = filled(10, max_age=3.0)  # times 0..9
    assert ring.oldest_id == "id6"
    ring.expire(now=100.0)
    assert len(ring) == 1 and ring.newest_id == "id9"


def test_duplicate_ids_resolve_to_the_newest_and_survive_old_eviction() -> None:
    ring = Ring(max_events=3, max_bytes=1 << 20, max_age=0)
    ring.append("a", b"1", 0)
    ring.append("a", b"2", 0)
    ring.append("b", b"3", 0)
    assert ring.seq_of("a") == 1
    ring.append("c", b"4", 0)  # evicts seq 0 ("a", superseded)
    assert ring.seq_of("a") == 1
    assert not ring.was_evicted("a")


@pytest.mark.parametrize(
    ("start", "max_bytes", "expected", "stop"),
    [
        pytest.param(0, 1, b"e0;", 1, id="at-least-one"),
        pytest.param(0, 7, b"e0;e1;e2;", 3, id="crosses-limit-by-one"),
        pytest.param(3, 1000, b"e3;e4;", 5, id="to-head"),
    ],
)
def test_take_returns_bounded_slices(
    start: int, max_bytes: int, expected: bytes, stop: int
) -> None:
    ring = filled(5)
    assert ring.take(start, max_bytes) == (expected, stop)


def test_bytes_from_counts_encoded_bytes_to_head() -> None:
    ring = filled(12, max_events=10)
    assert ring.bytes_from(ring.next_seq) == 0
    assert ring.bytes_from(10) == len(b"e10;e11;")


def test_seq_since_finds_first_event_at_or_after_time() -> None:
    ring = filled(10)  # event i at time i
    assert ring.seq_since(4.0) == 4
    assert ring.seq_since(4.5) == 5
    assert ring.seq_since(-1) == ring.first_seq
    assert ring.seq_since(50) == ring.next_seq


def test_evicted_id_memory_is_bounded() -> None:
    total = EVICTED_MEMORY_MIN + 1000
    ring = filled(total, max_events=10)
    assert len(ring._evicted) == EVICTED_MEMORY_MIN
    oldest_remembered = total - 10 - EVICTED_MEMORY_MIN
    assert ring.was_evicted(f"id{oldest_remembered}")
    assert not ring.was_evicted(f"id{oldest_remembered - 1}")


def test_a_held_or_evicted_event_is_told_from_a_new_one_with_its_id() -> None:
    ring = filled(20, max_events=10)  # holds id10..id19; id0..id9 evicted
    for seq in (5, 15):  # one evicted, one held
        same = f"e{seq};".encode()
        assert ring.holds_copy(f"id{seq}", same)
        assert not ring.holds_copy(f"id{seq}", same + b"!")
    assert not ring.holds_copy("id20", f"e{20};".encode())  # never seen


def test_rejects_empty_capacity() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Ring(max_events=0, max_bytes=1, max_age=0)


def test_slots_grow_to_max_events_and_keep_every_seq_in_place() -> None:
    ring = Ring(max_events=100, max_bytes=1 << 20, max_age=0)
    for n in range(250):  # grows 8 -> 16 -> ... -> 100, then wraps
        ring.append(f"e{n}", b"x%d" % n, float(n))
        assert ring.join(ring.first_seq, ring.next_seq) == b"".join(
            b"x%d" % k for k in range(ring.first_seq, n + 1)
        )
    assert len(ring) == 100 and ring.oldest_id == "e150" and ring.newest_id == "e249"
    assert ring.seq_of("e200") == 200 and ring.time_at(200) == 200.0
    assert ring.seq_since(180.0) == 180 and ring.was_evicted("e149")


def test_budget_evicts_oldest_of_the_rings_holding_most_and_keeps_each_newest() -> None:
    budget = RingBudget(limit=1000)
    heavy = Ring(max_events=100, max_bytes=1 << 20, max_age=0, budget=budget)
    light = Ring(max_events=100, max_bytes=1 << 20, max_age=0, budget=budget)
    for n in range(3):
        light.append(f"l{n}", b"l" * 50, 0.0)  # 150 bytes
    for n in range(20):
        heavy.append(f"h{n}", b"h" * 50, 0.0)  # 1000 bytes: past the limit at h17
    assert budget.held == heavy.held_bytes + light.held_bytes <= budget.limit
    assert len(light) == 3  # the light ring lost nothing
    assert heavy.was_evicted("h0") and heavy.newest_id == "h19"
    assert budget.held <= int(budget.limit * RECLAIM_TO)
    # Two rings holding the same: both shrink, each keeps its newest event.
    tiny = RingBudget(limit=100)
    a = Ring(max_events=10, max_bytes=1 << 20, max_age=0, budget=tiny)
    b = Ring(max_events=10, max_bytes=1 << 20, max_age=0, budget=tiny)
    a.append("a", b"a" * 80, 0.0)
    b.append("b", b"b" * 80, 0.0)
    assert (len(a), len(b)) == (1, 1) and tiny.held == 160  # the newest always stays
    a.release()
    assert tiny.held == 80 and a not in tiny.rings


def test_an_empty_ring_can_start_at_any_seq_and_numbers_on_from_there() -> None:
    ring = Ring(max_events=4, max_bytes=1 << 20, max_age=0)
    ring.start_at(2**40)
    for i in range(6):
        assert ring.append(f"id{i}", f"e{i};".encode(), now=0) == 2**40 + i
    assert (ring.first_seq, ring.next_seq) == (2**40 + 2, 2**40 + 6)
    assert ring.join(ring.first_seq, ring.next_seq) == b"e2;e3;e4;e5;"
    with pytest.raises(ValueError, match="holding 4 events"):
        ring.start_at(0)
    ring.clear()
    with pytest.raises(ValueError, match="seqs are >= 0"):
        ring.start_at(-1)


def test_the_evicted_memory_reads_out_and_back_in_oldest_first_within_its_bound() -> None:
    ring = filled(12, max_events=10)
    assert ring.evicted_memory() == (["id0", "id1"], [crc32(b"e0;"), crc32(b"e1;")])
    other = Ring(max_events=1, max_bytes=1 << 20, max_age=0)
    other.remember_evicted(*ring.evicted_memory())
    assert other.evicted_memory() == ring.evicted_memory()
    assert other.holds_copy("id1", b"e1;") and not other.holds_copy("id1", b"other")
    many = [f"x{i}" for i in range(EVICTED_MEMORY_MIN + 5)]
    other.remember_evicted(many, range(len(many)))
    assert other.evicted_memory() == (many[5:], list(range(5, len(many))))  # oldest go first


@settings(max_examples=200)
@given(
    sizes=st.lists(st.integers(0, 40), max_size=60),
    gaps=st.data(),
    max_events=st.integers(1, 20),
    max_bytes=st.integers(1, 400),
    max_age=st.sampled_from([0, 5.0]),
    start=st.integers(0, 10**12),
    unnamed=st.sets(st.integers(0, 59)),
)
def test_a_bulk_restore_ends_where_one_append_per_event_does(
    sizes: list[int],
    gaps: st.DataObject,
    max_events: int,
    max_bytes: int,
    max_age: float,
    start: int,
    unnamed: set[int],
) -> None:
    """Ring.restore against the appends it stands for: seqs, held events, the
    id index, the evicted-id memory and the bytes, for any bounds (ids are
    distinct or empty: a reused id is the one case it documents as different)."""
    ids = ["" if n in unnamed else f"id{n}" for n in range(len(sizes))]
    data = [bytes([n % 256]) * size for n, size in enumerate(sizes)]
    steps = gaps.draw(st.lists(st.floats(0, 3), min_size=len(sizes), max_size=len(sizes)))
    times = list(accumulate(steps))
    one_by_one, bulk = (
        Ring(max_events=max_events, max_bytes=max_bytes, max_age=max_age) for _ in range(2)
    )
    for ring in (one_by_one, bulk):
        ring.start_at(start)
        ring.remember_evicted(["before"], [7])
    for event_id, raw, t in zip(ids, data, times, strict=True):
        one_by_one.append(event_id, raw, t)
    bulk.restore(ids, data, times)
    assert (bulk.first_seq, bulk.next_seq) == (one_by_one.first_seq, one_by_one.next_seq)
    assert bulk.held() == one_by_one.held()
    assert bulk._index == one_by_one._index
    assert bulk.evicted_memory() == one_by_one.evicted_memory()
    assert bulk.held_bytes == one_by_one.held_bytes
    for seq in range(bulk.first_seq, bulk.next_seq):
        assert bulk.take(seq, 1) == one_by_one.take(seq, 1)


def test_a_bulk_restore_counts_its_bytes_against_the_budget() -> None:
    budget = RingBudget(limit=100)
    ring = Ring(max_events=100, max_bytes=1 << 20, max_age=0, budget=budget)
    ring.restore([f"id{n}" for n in range(30)], [b"0123456789"] * 30, [0.0] * 30)
    assert budget.held == ring.held_bytes <= 100 * RECLAIM_TO
    assert ring.newest_id == "id29" and ring.was_evicted("id0")
    with pytest.raises(ValueError, match="holding"):
        ring.restore(["x"], [b""], [0.0])
