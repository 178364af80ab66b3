"""Microbenchmarks for `state_dir` (core.persist, stream.state): what the hot
path pays per read, and what a full ring costs to save and to load.

Run:

    .venv/bin/python -m pytest bench/test_state_bench.py --benchmark-only -p no:cacheprovider -s

(see bench/test_codec_bench.py for why this command). The journal numbers
are the hot path: one upstream read of 10 events of 200 B each becomes 10
EVENT records and a MARK appended to the journal's buffer, no system call.
The snapshot numbers are for a full 16 MiB ring (the default
`buffer_bytes`) of 200 B events whose evicted-id memory is full too: a
clean stop pays them once per channel, a rotation once per journal.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from ssefan.core.fanout import Intake
from ssefan.core.persist import (
    RingState,
    capture,
    decode_snapshot,
    encode_snapshot,
    journal_event,
    journal_header,
    journal_mark,
    record_limit,
    restore_into,
)
from ssefan.core.ring import EVICTED_MEMORY_FACTOR, Ring
from ssefan.core.sse import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES
from ssefan.stream.state import Journal, write_snapshot

EVENT_BYTES = 200
RING_BYTES = 16 * 1024 * 1024
ROUTE, KEY, WORKER = "/events", "", 0
LIMIT = record_limit(DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_LINE_BYTES)


def _event(seq: int) -> tuple[str, bytes]:
    event_id = f"18c2f3a9b01-{seq}"
    head = f"id: {event_id}\ndata: ".encode()
    return event_id, head + b"x" * (EVENT_BYTES - len(head) - 2) + b"\n\n"


def _report(benchmark: Any, label: str, items: int = 1, unit: str = "") -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["us/call"] = round(mean * 1e6, 3)
    each = f", {mean / items * 1e9:,.0f} ns per {unit}" if unit else ""
    print(f"\n{label}: {mean * 1e3:,.3f} ms per call{each}")


# --------------------------------------------------------------------------- journal


@pytest.fixture
def journal(tmp_path: Path) -> Journal:
    header = journal_header(
        route=ROUTE, key=KEY, worker=WORKER, generation=0, start_seq=0, id_prefix="p-"
    )
    return Journal.create(tmp_path / "x.journal", header)


def test_journal_append_of_one_read_of_10_events(benchmark: Any, journal: Journal) -> None:
    """Encode 10 EVENT records and a MARK and append them to the buffer."""
    batch = [_event(seq) for seq in range(10)]
    wall = time.time()

    def read() -> None:
        for seq, (event_id, data) in enumerate(batch):
            journal.append(journal_event(seq, wall, event_id, data))
        journal.append(journal_mark(batch[-1][0]))

    def drain() -> None:
        journal.take()

    benchmark.pedantic(read, setup=drain, rounds=20_000, iterations=1)
    assert journal.pending == sum(len(journal_event(0, wall, i, d)) for i, d in batch) + len(
        journal_mark(batch[-1][0])
    )
    _report(benchmark, "journal append, 10 events + mark", 10, "event")
    journal.close()


def test_journal_flush_of_one_second_at_10_events_per_second(
    benchmark: Any, journal: Journal
) -> None:
    """What `state_sync` costs a channel at 10 events/s: one write() of 10 records."""
    batch = b"".join(journal_event(seq, 0.0, *_event(seq)) for seq in range(10))

    def fill() -> None:
        journal.append(batch)

    benchmark.pedantic(journal.flush, setup=fill, rounds=5_000, iterations=1)
    _report(benchmark, f"journal flush of {len(batch)} B")
    journal.close()


# --------------------------------------------------------------------------- snapshot


def _full_ring() -> Intake:
    count = RING_BYTES // EVENT_BYTES
    ring = Ring(max_events=count, max_bytes=RING_BYTES, max_age=0)
    intake = Intake(ring, "18c2f3a9b01-")
    # Wrapped so that the evicted-id memory is as full as it gets.
    for seq in range(count * (1 + EVICTED_MEMORY_FACTOR)):
        ring.append(*_event(seq), 0.0)
    return intake


@pytest.fixture(scope="module")
def full() -> tuple[Intake, RingState, bytes]:
    intake = _full_ring()
    state = capture(
        intake.ring, intake, route=ROUTE, key=KEY, worker=WORKER, mono_now=0.0, wall_now=1.7e9
    )
    data = encode_snapshot(state)
    print(
        f"\nfull ring: {len(state.ids):,} events, {intake.ring.held_bytes:,} B held,"
        f" {len(state.evicted_ids):,} evicted ids; snapshot {len(data):,} B"
    )
    return intake, state, data


def test_capture_of_a_full_16mib_ring(
    benchmark: Any, full: tuple[Intake, RingState, bytes]
) -> None:
    intake, _, _ = full
    benchmark.pedantic(
        lambda: capture(
            intake.ring, intake, route=ROUTE, key=KEY, worker=WORKER, mono_now=0.0, wall_now=1.7e9
        ),
        rounds=10,
        iterations=1,
    )
    _report(benchmark, "capture (in the loop)")


def test_encode_snapshot_of_a_full_16mib_ring(
    benchmark: Any, full: tuple[Intake, RingState, bytes]
) -> None:
    _, state, data = full
    out = benchmark.pedantic(encode_snapshot, args=(state,), rounds=10, iterations=1)
    assert out == data
    benchmark.extra_info["bytes"] = len(data)
    _report(benchmark, f"encode_snapshot ({len(data):,} B)")


def test_write_snapshot_of_a_full_16mib_ring(
    benchmark: Any, full: tuple[Intake, RingState, bytes], tmp_path: Path
) -> None:
    """Temporary file, write, fsync, rename, fsync of the directory: this disk's number."""
    _, _, data = full
    benchmark.pedantic(write_snapshot, args=(tmp_path / "x.snap", data), rounds=10, iterations=1)
    _report(benchmark, "write_snapshot (with both fsyncs)")


def test_decode_and_restore_of_a_full_16mib_ring(
    benchmark: Any, full: tuple[Intake, RingState, bytes]
) -> None:
    """What a start pays per full channel before the listener opens."""
    intake, state, data = full

    def load() -> Intake:
        got = decode_snapshot(
            data, expect_route=ROUTE, expect_key=KEY, expect_worker=WORKER, max_record_bytes=LIMIT
        )
        ring = Ring(max_events=len(state.ids), max_bytes=RING_BYTES, max_age=0)
        into = Intake(ring, "new-")
        restore_into(got, ring, into, mono_now=0.0, wall_now=1.7e9)
        return into

    into = benchmark.pedantic(load, rounds=5, iterations=1)
    assert into.next_assigned_id() == intake.next_assigned_id()
    _report(benchmark, "decode_snapshot + restore_into")
