"""core.fanout.Intake without a loop: what one upstream read becomes."""

from __future__ import annotations

from ssefan.core.fanout import Intake
from ssefan.core.ring import Ring
from ssefan.core.sse import Event, IdOnly, Overflow, encode

PREFIX = "p-"


def intake(max_events: int = 100) -> Intake:
    return Intake(Ring(max_events=max_events, max_bytes=1 << 20, max_age=0), PREFIX)


def events(ids: range, text: str = "payload") -> list[Event | IdOnly | Overflow]:
    return [Event(f"{text} {i}", id=str(i)) for i in ids]


def test_events_are_encoded_once_into_the_ring_and_returned_in_order() -> None:
    log = intake()
    got = log.accept(events(range(1, 4)), now=1.0)
    assert got.events == [encode(Event(f"payload {i}", id=str(i))) for i in range(1, 4)]
    assert log.ring.join(0, 3) == b"".join(got.events)
    assert log.last_upstream_id == "3"


def test_after_a_reconnect_only_byte_identical_events_are_replays() -> None:
    log = intake()
    log.accept(events(range(1, 6)), now=1.0)
    log.reconnected()
    got = log.accept(events(range(3, 8)), now=2.0)  # 3..5 again, then new
    assert got.replays == 3
    assert [b.split(b"\n")[0] for b in got.events] == [b"id: 6", b"id: 7"]
    assert got.reused == []


def test_a_reused_id_with_other_bytes_gets_an_assigned_id() -> None:
    log = intake()
    log.accept(events(range(1, 3)), now=1.0)
    log.reconnected()
    got = log.accept(events(range(1, 3), text="after a deploy"), now=2.0)
    assert got.replays == 0
    assert got.reused == [("1", f"{PREFIX}2"), ("2", f"{PREFIX}3")]
    assert log.ring.seq_of("1") == 0  # "1" still names the first event


def test_evicted_events_are_recognised_by_their_digest() -> None:
    log = intake(max_events=2)
    log.accept(events(range(1, 6)), now=1.0)  # holds 4, 5; 1..3 evicted
    log.reconnected()
    got = log.accept([*events(range(2, 4)), Event("new", id="1")], now=2.0)
    assert got.replays == 2
    assert got.reused == [("1", f"{PREFIX}5")]


def test_ids_that_cannot_be_resumed_and_missing_ids_are_assigned() -> None:
    log = intake()
    got = log.accept([Event("a"), Event("b", id=" 7")], now=1.0)
    assert [b.split(b"\n")[0] for b in got.events] == [b"id: p-0", b"id: p-1"]
    assert log.last_upstream_id == " 7"


def test_id_only_blocks_and_overflows() -> None:
    log = intake()
    too_big = Overflow("event", 10_000)
    got = log.accept([IdOnly("9"), too_big, IdOnly("9")], now=1.0)
    assert got.events == [b"id: 9\n\n"]  # the second names nothing new
    assert got.overflows == [too_big]


def test_a_batch_larger_than_the_ring_is_returned_whole() -> None:
    log = intake(max_events=2)
    got = log.accept(events(range(5)), now=1.0)
    assert len(got.events) == 5 and len(log.ring) == 2
