"""Tests for ssefan.sse: the WHATWG HTML §9.2 parser and the canonical encoder.

Every framing vector is fed whole, byte by byte, and split at every offset (the
h11 test technique), since a parser that is right on whole bodies can still be
wrong at a chunk boundary (CRLF, BOM and UTF-8 splits).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssefan.core.sse import (
    MAX_RETRY_MS,
    Event,
    IdOnly,
    Overflow,
    Parser,
    encode,
    encode_comment,
    encode_id,
    encode_retry,
    encode_with_id,
)

Item = Event | IdOnly | Overflow
# What a browser sees per fired event: (type, data, the block's own id, lastEventId).
Seen = tuple[str, str, str | None, str]

MODES = ["whole", "bytewise", "every-split"]


# --------------------------------------------------------------------------- helpers


def chunkings(body: bytes, mode: str) -> Iterator[list[bytes]]:
    """The ways one body is cut into feeds."""
    if mode == "whole":
        yield [body]
    elif mode == "bytewise":
        yield [body[i : i + 1] for i in range(len(body))]
    else:
        for i in range(len(body) + 1):
            yield [body[:i], body[i:]]


def cut(body: bytes, offsets: Sequence[int]) -> list[bytes]:
    """Split body at the given offsets (any order, duplicates allowed)."""
    points = [0, *sorted(offsets), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(points)]


class Run:
    """Feed chunks to a fresh parser and record what a caller could observe."""

    def __init__(self, chunks: Sequence[bytes], **limits: int) -> None:
        self.parser = Parser(**limits)
        self.items: list[Item] = []
        # parser.last_event_id read right after each feed that produced items,
        # paired with the index of the last item of that feed.
        self.observed: list[tuple[int, str]] = []
        self.batch_sizes: list[int] = []
        for chunk in chunks:
            batch = self.parser.feed(chunk)
            self.items += batch
            self.batch_sizes.append(len(batch))
            if batch:
                self.observed.append((len(self.items) - 1, self.parser.last_event_id))
        self.tail = self.parser.close()
        self.items += self.tail

    def sticky_ids(self) -> list[str]:
        """lastEventId after each item, computed from per-block ids + stickiness."""
        last, out = "", []
        for item in self.items:
            # IdOnly always carries an id; an Event only when its block set one.
            if isinstance(item, IdOnly | Event) and item.id is not None:
                last = item.id
            out.append(last)
        return out

    def browser_view(self) -> list[Seen]:
        sticky = self.sticky_ids()
        return [
            (item.event or "message", item.data, item.id, sticky[i])
            for i, item in enumerate(self.items)
            if isinstance(item, Event)
        ]

    def check_sticky(self) -> None:
        """The parser's own last_event_id agrees with the per-block ids, always."""
        sticky = self.sticky_ids()
        for index, seen in self.observed:
            assert seen == sticky[index]
        assert self.parser.last_event_id == (sticky[-1] if sticky else "")


def parse(body: bytes, **limits: int) -> list[Item]:
    run = Run([body], **limits)
    return run.items


def reencode(item: Item) -> bytes:
    """What a re-broadcaster sends for one parser item."""
    if isinstance(item, Event):
        return encode(item)
    assert isinstance(item, IdOnly)
    return encode_id(item.id)


def msg(data: str, type: str = "message", id: str | None = None, last: str = "") -> Seen:
    return (type, data, id, last)


# --------------------------------------------------------------------------- wpt corpus

# web-platform-tests eventsource/ parser vectors (reference §1.9). Each body is
# what resources/message.py serves, trailing newline included.
WPT_VECTORS = [
    pytest.param(
        b"data:msg\ndata: msg\n\n:\nfalsefield:msg\n\nfalsefield:msg\nData:data\n\n"
        b"data\n\ndata:end\n\n",
        [msg("msg\nmsg"), msg(""), msg("end")],
        id="event-data",
    ),
    pytest.param(
        b"\xef\xbb\xbfdata:1\n\n\xef\xbb\xbfdata:2\n\ndata:3\n\n\n",
        [msg("1"), msg("3")],
        id="format-bom",
    ),
    pytest.param(
        b"\xef\xbb\xbf\xef\xbb\xbfdata:1\n\ndata:2\n\ndata:3\n\n\n",
        [msg("2"), msg("3")],
        id="format-bom-2",
    ),
    pytest.param(
        b"data:1\r:\0\n:\r\ndata:2\n:"
        + b"x" * 2048
        + b"\rdata:3\n:data:fail\r:"
        + b"x" * 2048
        + b"\ndata:4\n\n",
        [msg("1\n2\n3\n4")],
        id="format-comments",
    ),
    pytest.param(
        # The unfinished block's data and id are discarded at EOF: the parser's
        # final last_event_id must stay "" (checked by Run.check_sticky).
        b"retry:1000\ndata:test1\n\nid:test\ndata:test2\n",
        [msg("test1")],
        id="format-data-before-final-empty-line",
    ),
    pytest.param(
        b"data:\n\ndata\ndata\n\ndata:test\n\n\n",
        [msg(""), msg("\n"), msg("test")],
        id="format-field-data",
    ),
    pytest.param(
        b"event:test\ndata:x\n\ndata:x\n\n\n",
        [msg("x", type="test"), msg("x")],
        id="format-field-event",
    ),
    pytest.param(b"event: \ndata:data\n\n\n", [msg("data")], id="format-field-event-empty"),
    pytest.param(
        b"data:\0\ndata:  2\rData:1\ndata\0:2\ndata:1\r\0data:4\nda-ta:3\rdata_5\ndata:3\r"
        b"data:\r\n data:32\ndata:4\n\n",
        [msg("\0\n 2\n1\n3\n\n4")],
        id="format-field-parsing",
    ),
    pytest.param(
        b"data:test\n data\ndata\nfoobar:xxx\njustsometext\n:thisisacommentyay\ndata:test\n\n\n",
        [msg("test\n\ntest")],
        id="format-field-unknown",
    ),
    pytest.param(
        b"data:\ttest\rdata: \ndata:test\n\n\n", [msg("\ttest\n\ntest")], id="format-leading-space"
    ),
    pytest.param(
        b"data:test\r\ndata\ndata:test\r\n\r\n", [msg("test\n\ntest")], id="format-newlines"
    ),
    pytest.param(b"data:\0\n\n\n\n\n", [msg("\0")], id="format-null-character"),
    pytest.param(b"data:ok\xe2\x80\xa6\n\n\n", [msg("ok\u2026")], id="format-utf-8"),
    pytest.param(b"retry\ndata:test\n\n\n", [msg("test")], id="format-field-retry-empty"),
    pytest.param(
        b"id: 1\ndata: 1\n\ndata: 2\n\nid: 2\ndata:3\n\ndata:4\n\n",
        [
            msg("1", id="1", last="1"),
            msg("2", last="1"),
            msg("3", id="2", last="2"),
            msg("4", last="2"),
        ],
        id="format-field-id-3-persist",
    ),
    pytest.param(
        b"id: 1\ndata: 1\n\nid:\ndata:2\n\ndata:3\n\n",
        [msg("1", id="1", last="1"), msg("2", id="", last=""), msg("3", last="")],
        id="format-field-id-3-reset",
    ),
    pytest.param(
        b"id: 1\ndata: 1\n\nid\ndata:2\n\ndata:3\n\n",
        [msg("1", id="1", last="1"), msg("2", id="", last=""), msg("3", last="")],
        id="format-field-id-3-reset-no-colon",
    ),
    pytest.param(
        b"data: cr\r\rdata: lf\n\ndata: crlf\r\n\r\n",
        [msg("cr"), msg("lf"), msg("crlf")],
        id="from-readable-stream-cr-lf-crlf",
    ),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("body", "expected"), WPT_VECTORS)
def test_wpt_vectors(body: bytes, expected: list[Seen], mode: str) -> None:
    for chunks in chunkings(body, mode):
        run = Run(chunks)
        assert run.browser_view() == expected
        assert not any(isinstance(item, Overflow) for item in run.items)
        assert run.tail == []
        run.check_sticky()
        if mode == "bytewise":
            # One byte ends at most one line, so every item's lastEventId was
            # read straight off the parser.
            assert max(run.batch_sizes, default=0) <= 1


@pytest.mark.parametrize(("body", "expected"), WPT_VECTORS)
def test_wpt_vectors_survive_reencoding(body: bytes, expected: list[Seen]) -> None:
    # parse(encode(parse(x))) == parse(x): what ssefan re-broadcasts means the
    # same to a browser as what the upstream sent.
    items = parse(body)
    reencoded = b"".join(map(reencode, items))
    assert parse(reencoded) == items
    assert Run([reencoded]).browser_view() == expected


def test_data_before_final_empty_line_keeps_retry() -> None:
    parser = Parser()
    parser.feed(b"retry:1000\ndata:test1\n\nid:test\ndata:test2\n")
    assert parser.close() == []
    assert parser.retry == 1000
    assert parser.last_event_id == ""


# --------------------------------------------------------------------------- framing (A)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        pytest.param([b"da", b"ta: hel", b"lo\n\n"], [Event("hello")], id="A1-line-split"),
        pytest.param(
            [b"data: A\r\n", b"data: B\r", b"\n", b"data: C\r\n", b"\n"],
            [Event("A\nB\nC")],
            id="A2-crlf-split",
        ),
        pytest.param([b"data: first\r\ndata: second\n\n"], [Event("first\nsecond")], id="A3-mixed"),
        pytest.param(
            [b"data: a\r", b"\ndata: b\n\r", b"\n\r\n"], [Event("a\nb")], id="A3-mixed-split"
        ),
        pytest.param([b"data: cr\r\r"], [Event("cr")], id="A4-cr-only"),
        pytest.param([b"\xef", b"\xbb", b"\xbfdata:1\n\n"], [Event("1")], id="A5-bom-3-feeds"),
        pytest.param([b"\xef\xbb\xbf", b"data:1\n\n"], [Event("1")], id="A5-bom-own-feed"),
        pytest.param([b"", b"\xef\xbb\xbf", b"", b"data:1\n\n"], [Event("1")], id="A5-empty-feeds"),
        pytest.param([b"data: ok\xe2\x80", b"\xa6\n\n"], [Event("ok\u2026")], id="A6-utf8-split"),
        pytest.param(
            [b"data: \xf0\x9f", b"\x98", b"\x80\n\n"], [Event("\U0001f600")], id="A6-4-byte-split"
        ),
    ],
)
def test_framing(chunks: list[bytes], expected: list[Item]) -> None:
    assert Run(chunks).items == expected
    # And the same body fed any other way gives the same.
    body = b"".join(chunks)
    for mode in MODES:
        for other in chunkings(body, mode):
            assert Run(other).items == expected


def test_cr_at_end_of_feed_ends_the_line_at_once() -> None:
    # A2/A4: a parser that waits for the byte after a CR stalls CR-only streams.
    parser = Parser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\r") == [Event("x")]
    # ...and an LF after a CR that ended a feed is not a blank line.
    assert parser.feed(b"data: y\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\n") == [Event("y")]


def test_lf_is_only_swallowed_right_after_the_cr() -> None:
    parser = Parser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"data: y\n") == []  # the CR already ended "data: x"
    assert parser.feed(b"\n") == [Event("x\ny")]


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        # Only the first BOM of a stream is stripped; a later one lands in the
        # field name, which then matches nothing (B4).
        pytest.param([b"data:1\n\n", b"\xef\xbb\xbfdata:2\n\n"], [Event("1")], id="later-bom"),
        pytest.param([b"\xef\xbb", b"data:1\n\n"], [], id="bom-prefix-only"),
        pytest.param([b"data:\xef\xbb\xbfx\n\n"], [Event("\ufeffx")], id="bom-in-value-kept"),
    ],
)
def test_bom_only_at_stream_start(chunks: list[bytes], expected: list[Item]) -> None:
    assert Run(chunks).items == expected


def test_bom_is_per_parser_instance() -> None:
    # Each upstream response is a new body (B3), hence a new parser.
    for _ in range(2):
        assert parse(b"\xef\xbb\xbfdata:1\n\n") == [Event("1")]


# --------------------------------------------------------------------------- decoding (B)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        # CPython errors="replace" = WHATWG maximal-subpart replacement (B1).
        pytest.param(b"\xe2\x80A", "\ufffdA", id="truncated-3-byte"),
        pytest.param(b"\xf0\x80\x80", "\ufffd" * 3, id="overlong-4-byte"),
        pytest.param(b"\xed\xa0\x80", "\ufffd" * 3, id="surrogate"),
        pytest.param(b"\xc0\xaf", "\ufffd" * 2, id="overlong-2-byte"),
        pytest.param(b"\xf4\x90\x80\x80", "\ufffd" * 4, id="above-10ffff"),
        pytest.param(b"\xff", "\ufffd", id="ff"),
        pytest.param(b"a\xe2\x80", "a\ufffd", id="truncated-at-line-end"),
    ],
)
@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_invalid_utf8_becomes_replacement_characters(raw: bytes, text: str, mode: str) -> None:
    (chunks,) = chunkings(b"data: " + raw + b"\ndata: " + raw + b"\n\n", mode)
    assert Run(chunks).items == [Event(f"{text}\n{text}")]


def test_truncated_sequences_do_not_merge_across_data_lines() -> None:
    # Per-line decoding must equal whole-body decoding: the LF ends the sequence.
    assert parse(b"data: \xe2\ndata: \x80\xa6\n\n") == [Event("\ufffd\n\ufffd\ufffd")]


def test_invalid_utf8_in_id_and_event() -> None:
    assert parse(b"id: \xff\nevent: \xc0\ndata: x\n\n") == [Event("x", event="\ufffd", id="\ufffd")]


def test_unicode_line_separators_are_not_line_ends() -> None:
    # P1/B6: str.splitlines() would split on all of these.
    value = "a\u2028b\u2029c\x85d\x0be\x0cf\x1cg\x1dh\x1ei"
    assert parse(b"data: " + value.encode() + b"\n\n") == [Event(value)]


# --------------------------------------------------------------------------- fields (C)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b"data: a:b\n\n", [Event("a:b")], id="C12-first-colon"),
        pytest.param(b"data:  x\n\n", [Event(" x")], id="one-space-stripped"),
        pytest.param(b"data:\tx\n\n", [Event("\tx")], id="tab-kept"),
        pytest.param(b"data :x\n ata:y\nDATA:z\n\n", [], id="C11-name-variants"),
        pytest.param(b"event: x\n\n: c\n\nfoo: bar\n\n\n\n\n", [], id="C14-nothing-fires"),
        pytest.param(b"event: a\nevent:\ndata: x\n\n", [Event("x")], id="event-reset-in-block"),
        pytest.param(b"event: a\n\ndata: x\n\n", [Event("x")], id="event-not-sticky"),
        pytest.param(b"id: 5\n\n", [IdOnly("5")], id="C8-id-only"),
        pytest.param(b"id: 5\nevent: e\n: c\n\n", [IdOnly("5")], id="C8-id-and-event-only"),
        pytest.param(b"id: 5\n\nid\n\n", [IdOnly("5"), IdOnly("")], id="C6-id-only-reset"),
        pytest.param(b"id: 1\nid: 2\ndata: x\n\n", [Event("x", id="2")], id="last-id-wins"),
        pytest.param(b"retry: 7\n\n", [], id="retry-only-fires-nothing"),
        pytest.param(
            b"data: x\nretry: 7\n\ndata: y\n\n",
            [Event("x", retry=7), Event("y")],
            id="retry-per-block",
        ),
    ],
)
def test_fields(body: bytes, expected: list[Item]) -> None:
    assert parse(body) == expected


@pytest.mark.parametrize("bad", ["\0\0", "x\0", "\0x", "x\0x", " \0"])
def test_id_with_nul_is_ignored(bad: str) -> None:
    # C5 (wpt format-field-id-null and the values tried in wpt PR #6584).
    raw = bad.encode()
    run = Run([b"id: 1\ndata: a\n\nid:" + raw + b"\ndata: b\n\nid:" + raw + b"\n\n"])
    assert run.items == [Event("a", id="1"), Event("b")]
    assert run.parser.last_event_id == "1"


def test_nul_id_does_not_undo_an_earlier_id_in_the_block() -> None:
    assert parse(b"id: 1\nid: 2\0\ndata: x\n\n") == [Event("x", id="1")]


def test_id_only_block_moves_the_sticky_id() -> None:
    parser = Parser()
    assert parser.feed(b"id: 1\ndata: a\n\nid: 5\n\n") == [Event("a", id="1"), IdOnly("5")]
    assert parser.last_event_id == "5"
    assert parser.feed(b"data: b\n\n") == [Event("b")]
    assert parser.last_event_id == "5"
    assert parser.feed(b"id\n\n") == [IdOnly("")]
    assert parser.last_event_id == ""


@pytest.mark.parametrize(
    ("line", "block_retry", "parser_retry"),
    [
        pytest.param("retry: 03000", 3000, 3000, id="leading-zero-decimal"),
        pytest.param("retry:0", 0, 0, id="zero"),
        pytest.param("retry: 1000x", None, 5000, id="trailing-junk"),
        pytest.param("retry: \u0663", None, 5000, id="arabic-indic-digit"),
        pytest.param("retry: \u00b2", None, 5000, id="superscript-two"),
        pytest.param("retry: +5", None, 5000, id="plus-sign"),
        pytest.param("retry: -5", None, 5000, id="minus-sign"),
        pytest.param("retry:  5", None, 5000, id="second-space"),
        pytest.param("retry: 5 ", None, 5000, id="trailing-space"),
        pytest.param("retry: 1_000", None, 5000, id="underscore"),
        pytest.param("retry: 1.5", None, 5000, id="decimal-point"),
        pytest.param("retry:", None, 5000, id="empty"),
        pytest.param("retry", None, 5000, id="bare-name"),
    ],
)
def test_retry_is_ascii_digits_only(line: str, block_retry: int | None, parser_retry: int) -> None:
    parser = Parser()
    assert parser.feed(b"retry: 5000\n\n") == []
    assert parser.retry == 5000
    assert parser.feed(line.encode() + b"\ndata: x\n\n") == [Event("x", retry=block_retry)]
    assert parser.retry == parser_retry


@pytest.mark.parametrize(
    ("digits", "expected"),
    [
        pytest.param(str(MAX_RETRY_MS), MAX_RETRY_MS, id="at-max"),
        pytest.param(str(MAX_RETRY_MS - 1), MAX_RETRY_MS - 1, id="below-max"),
        pytest.param(str(MAX_RETRY_MS + 1), MAX_RETRY_MS, id="above-max"),
        pytest.param("99999999999999999999", MAX_RETRY_MS, id="20-digits"),
        # More digits than CPython's int_max_str_digits (4300) must not raise.
        pytest.param("9" * 10_000, MAX_RETRY_MS, id="10k-digits"),
        pytest.param("0" * 10_000 + "7", 7, id="10k-leading-zeros"),
    ],
)
def test_retry_is_clamped(digits: str, expected: int) -> None:
    parser = Parser()
    assert parser.feed(f"retry: {digits}\ndata: x\n\n".encode()) == [Event("x", retry=expected)]
    assert parser.retry == expected


def test_unfinished_block_is_discarded_and_its_id_not_committed() -> None:
    # C9 / §9.2.6 "any pending data must be discarded" at EOF.
    parser = Parser()
    assert parser.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n") == [Event("a", id="1")]
    assert parser.close() == []
    assert parser.last_event_id == "1"


def test_unfinished_id_only_block_is_discarded() -> None:
    parser = Parser()
    assert parser.feed(b"id: 1\n\nid: 2\n") == [IdOnly("1")]
    assert parser.close() == []
    assert parser.last_event_id == "1"


def test_unterminated_last_line_is_discarded() -> None:
    # The current grammar has no `eof` alternative in end-of-line.
    parser = Parser()
    assert parser.feed(b"data: a\n\ndata: b\n\n\xef") == [Event("a"), Event("b")]
    assert parser.close() == []


def test_close_is_idempotent_and_feed_after_close_raises() -> None:
    parser = Parser()
    parser.feed(b"data: x\n")
    assert parser.close() == []
    assert parser.close() == []
    with pytest.raises(ValueError, match="after close"):
        parser.feed(b"\n")


# --------------------------------------------------------------------------- limits (E)


@pytest.mark.parametrize("mode", MODES)
def test_over_long_line_drops_its_event_and_resyncs(mode: str) -> None:
    body = (
        b"data: ok1\n\n"
        b"id: 9\ndata: before\ndata: " + b"x" * 100 + b"\ndata: after\nid: 10\n\n"
        b"data: ok2\n\n"
    )
    expected = [Event("ok1"), Overflow("line", 17), Event("ok2")]
    for chunks in chunkings(body, mode):
        run = Run(chunks, max_line_bytes=16)
        assert run.items == expected
        # The dropped block's id was never committed.
        assert run.parser.last_event_id == ""


def test_line_limit_boundary() -> None:
    line = b"data: " + b"x" * 10  # 16 bytes
    assert parse(line + b"\n\n", max_line_bytes=16) == [Event("x" * 10)]
    assert parse(line + b"x\n\n", max_line_bytes=16) == [Overflow("line", 17)]
    # The unterminated-line check uses the same boundary.
    parser = Parser(max_line_bytes=16)
    assert parser.feed(line) == []
    assert parser.feed(b"\n\n") == [Event("x" * 10)]
    assert parser.feed(line) == []
    assert parser.feed(b"x") == [Overflow("line", 17)]


def test_default_line_limit_is_one_mib() -> None:
    body = b"data:" + b"x" * (1024 * 1024 - 5)
    assert parse(body + b"\n\n") == [Event("x" * (1024 * 1024 - 5))]
    assert parse(body + b"x\n\n") == [Overflow("line", 1024 * 1024 + 1)]


@pytest.mark.parametrize("mode", MODES)
def test_over_size_event_drops_it_and_resyncs(mode: str) -> None:
    line = b"data: 0123456789\n"  # 10 value bytes + 1 LF in the data buffer
    body = b"data: ok1\n\n" + line * 6 + b"data: " + b"y" * 30 + b"\n\n" + b"data: ok2\n\n"
    # Exactly one Overflow for the block: later lines of it, even an over-long
    # one, are ignored, not reported again.
    expected = [Event("ok1"), Overflow("event", 33), Event("ok2")]
    for chunks in chunkings(body, mode):
        assert Run(chunks, max_line_bytes=24, max_event_bytes=32).items == expected


def test_event_limit_boundary() -> None:
    line = b"data: 0123456789\n"
    assert parse(line * 3 + b"\n", max_event_bytes=33) == [Event("\n".join(["0123456789"] * 3))]
    assert parse(line * 3 + b"\n", max_event_bytes=32) == [Overflow("event", 33)]


def test_default_event_limit_is_four_mib() -> None:
    line = b"data:" + b"x" * (1024 * 1024 - 5) + b"\n"  # 1 MiB - 4 in the buffer
    # 4 lines leave 16 bytes: a 15-byte value plus its LF fits exactly.
    assert parse(line * 4 + b"data:" + b"y" * 15 + b"\n\n") == [
        Event("\n".join(["x" * (1024 * 1024 - 5)] * 4 + ["y" * 15]))
    ]
    assert parse(line * 4 + b"data:" + b"y" * 16 + b"\n\n") == [
        Overflow("event", 4 * 1024 * 1024 + 1)
    ]


@pytest.mark.parametrize("feed_size", [1, 7, 100, 4096])
def test_unterminated_line_keeps_the_buffer_bounded(feed_size: int) -> None:
    limit = 1024
    parser = Parser(max_line_bytes=limit)
    items = parser.feed(b"id: 1\ndata: a\n\ndata: ")
    chunk = b"x" * feed_size
    for _ in range(200_000 // feed_size):
        items += parser.feed(chunk)
        assert len(parser._buf) <= limit
    assert items == [Event("a", id="1"), Overflow("line", limit + 1)]
    # Once the line ends and the block is over, parsing resumes.
    assert parser.feed(b"\nid: 2\n\ndata: ok\n\n") == [Event("ok")]
    assert parser.last_event_id == "1"


def test_default_limit_bounds_a_never_ending_line() -> None:
    parser = Parser()
    chunk = b"x" * 65536
    items: list[Item] = []
    for _ in range(48):  # 3 MiB, never terminated
        items += parser.feed(chunk)
        assert len(parser._buf) <= 1024 * 1024
    assert items == [Overflow("line", 1024 * 1024 + 1)]


def test_partial_line_while_resyncing_is_not_buffered() -> None:
    parser = Parser(max_line_bytes=64, max_event_bytes=8)
    assert parser.feed(b"data: 0123456789\n") == [Overflow("event", 11)]
    assert parser.feed(b"data: " + b"z" * 50) == []
    assert len(parser._buf) == 0
    assert parser.feed(b"\n\ndata: ok\n\n") == [Event("ok")]


@pytest.mark.parametrize(
    "limits",
    [{"max_line_bytes": 0}, {"max_event_bytes": 0}, {"max_line_bytes": -1}],
)
def test_limits_must_be_positive(limits: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="limits must be >= 1"):
        Parser(**limits)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"event": "a\nb"}, id="event-lf"),
        pytest.param({"event": "a\r"}, id="event-cr"),
        pytest.param({"id": "a\nb"}, id="id-lf"),
        pytest.param({"id": "\r"}, id="id-cr"),
        pytest.param({"id": "a\0"}, id="id-nul"),
        pytest.param({"retry": -1}, id="retry-negative"),
        pytest.param({"retry": True}, id="retry-bool"),
        pytest.param({"retry": 1.5}, id="retry-float"),
        pytest.param({"retry": "5"}, id="retry-str"),
    ],
)
def test_event_refuses_unframeable_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"Event\.(event|id|retry)"):
        Event("x", **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["a\n", "\rb", "a\r\nb", "\0"])
def test_id_only_refuses_unframeable_ids(bad: str) -> None:
    with pytest.raises(ValueError, match=r"IdOnly\.id"):
        IdOnly(bad)


def test_values_are_frozen_and_slotted() -> None:
    event = Event("x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.data = "y"  # type: ignore[misc]
    for value in (event, IdOnly("1"), Overflow("line", 2)):
        assert not hasattr(value, "__dict__")


# --------------------------------------------------------------------------- encoder (D)


@pytest.mark.parametrize(
    ("event", "wire"),
    [
        pytest.param(Event("hello"), b"data: hello\n\n", id="plain"),
        pytest.param(Event(""), b"data: \n\n", id="C2-empty-data-still-fires"),
        pytest.param(Event("a\nb"), b"data: a\ndata: b\n\n", id="C1-multiline"),
        pytest.param(Event("\n"), b"data: \ndata: \n\n", id="lone-lf"),
        pytest.param(Event(" x"), b"data:  x\n\n", id="C3-leading-space"),
        pytest.param(Event("a\r\nb\rc\n"), b"data: a\ndata: b\ndata: c\ndata: \n\n", id="cr"),
        pytest.param(
            Event("x", event="update", id="42", retry=3000),
            b"id: 42\nevent: update\nretry: 3000\ndata: x\n\n",
            id="all-fields-in-order",
        ),
        pytest.param(Event("x", id=""), b"id:\ndata: x\n\n", id="C6-id-reset"),
        pytest.param(Event("x", id=" a "), b"id:  a \ndata: x\n\n", id="id-spaces"),
        pytest.param(Event("x", event=" e"), b"event:  e\ndata: x\n\n", id="event-space"),
        pytest.param(Event("x", event=""), b"data: x\n\n", id="C4-empty-type-omitted"),
        pytest.param(Event("x", retry=0), b"retry: 0\ndata: x\n\n", id="retry-zero"),
        pytest.param(Event("ok\u2026\0"), b"data: ok\xe2\x80\xa6\0\n\n", id="utf8-and-nul"),
    ],
)
def test_encode_is_canonical(event: Event, wire: bytes) -> None:
    assert encode(event) == wire


@pytest.mark.parametrize(
    "data",
    [
        "x\n\nevent: admin\ndata: pwn",
        "x\r\n\r\nid: 9\r\ndata: pwn\r\n",
        "x\r\revent: admin\r",
        "\n\n",
        "\r\n\r\n",
        "\r\r",
        "\r\n",
    ],
)
def test_data_cannot_inject_a_second_event(data: str) -> None:
    wire = encode(Event(data))
    normalised = data.replace("\r\n", "\n").replace("\r", "\n")
    assert parse(wire) == [Event(normalised)]
    assert wire.endswith(b"\n\n")
    assert b"\n\n" not in wire[:-2]
    assert b"\r" not in wire


def test_encode_refuses_lone_surrogates() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        encode(Event("\ud800"))


@pytest.mark.parametrize(
    ("id", "wire"), [("5", b"id: 5\n\n"), ("", b"id:\n\n"), (" x", b"id:  x\n\n")]
)
def test_encode_id(id: str, wire: bytes) -> None:
    assert encode_id(id) == wire
    assert parse(wire) == [IdOnly(id)]


@pytest.mark.parametrize("bad", ["a\n", "a\rb", "\0"])
def test_encode_id_refuses_unframeable_ids(bad: str) -> None:
    with pytest.raises(ValueError, match="must not contain"):
        encode_id(bad)


@pytest.mark.parametrize(
    ("text", "wire"), [("keep-alive", b": keep-alive\n\n"), ("", b":\n\n"), ("\0", b": \0\n\n")]
)
def test_encode_comment(text: str, wire: bytes) -> None:
    assert encode_comment(text) == wire
    assert parse(wire + b"data: x\n\n") == [Event("x")]


@pytest.mark.parametrize("bad", ["a\nb", "a\r", "\r\n"])
def test_encode_comment_refuses_line_ends(bad: str) -> None:
    with pytest.raises(ValueError, match="comment must not contain CR or LF"):
        encode_comment(bad)


def test_encode_retry() -> None:
    assert encode_retry(3000) == b"retry: 3000\n\n"
    parser = Parser()
    assert parser.feed(encode_retry(1234)) == []
    assert parser.retry == 1234


@pytest.mark.parametrize("bad", [-1, True, 2.5, "5"])
def test_encode_retry_refuses_bad_numbers(bad: object) -> None:
    with pytest.raises(ValueError, match="retry must be an int >= 0"):
        encode_retry(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- properties

# Characters that have tripped SSE implementations: line ends, Unicode line
# separators that str.splitlines() honours, NUL, BOM, the field syntax itself.
_TRICKY = "\r\n\u2028\u2029\x85\x0b\x0c\x1c\x00\ufeff :"
_any_text = st.text(st.one_of(st.sampled_from(_TRICKY), st.characters(codec="utf-8")))
_line_text = st.text(
    st.one_of(
        st.sampled_from(_TRICKY.replace("\r", "").replace("\n", "")),
        st.characters(codec="utf-8", exclude_characters="\r\n"),
    )
)
_id_text = _line_text.filter(lambda s: "\0" not in s)

events = st.builds(
    Event,
    data=_any_text,
    event=_line_text,
    id=st.none() | _id_text,
    retry=st.none() | st.integers(0, MAX_RETRY_MS),
)


def _normalised(event: Event) -> Event:
    data = event.data.replace("\r\n", "\n").replace("\r", "\n")
    return dataclasses.replace(event, data=data)


@given(event=events)
def test_encode_then_parse_round_trips(event: Event) -> None:
    parser = Parser()
    assert parser.feed(encode(event)) == [_normalised(event)]
    assert parser.close() == []


@given(batch=st.lists(events, max_size=5), data=st.data())
def test_encoded_stream_round_trips_however_chunked(
    batch: list[Event], data: st.DataObject
) -> None:
    wire = b"".join(map(encode, batch))
    offsets = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    assert Run(cut(wire, offsets)).items == [_normalised(e) for e in batch]


# Bodies built from the pieces that matter, plus arbitrary bytes in between.
_fragments = st.sampled_from(
    [
        b"data",
        b"data:",
        b"data: ",
        b"id:",
        b"id: ",
        b"id",
        b"event:",
        b"retry:",
        b"retry: ",
        b":",
        b" ",
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b"\x00",
        b"\xef\xbb\xbf",
        b"\xef",
        b"\xe2\x80",
        b"\xa6",
        b"\xff",
        b"0",
        b"17",
        b"x",
        b"xxxxxxxxxxxxxxxx",
    ]
)
bodies = st.lists(_fragments | st.binary(max_size=6), max_size=40).map(b"".join)


def _outcome(chunks: Sequence[bytes], **limits: int) -> tuple[list[Item], str, int | None]:
    run = Run(chunks, **limits)
    run.check_sticky()
    return run.items, run.parser.last_event_id, run.parser.retry


@settings(max_examples=300)
@given(body=bodies, data=st.data())
@pytest.mark.parametrize(
    "limits",
    [
        pytest.param({}, id="default-limits"),
        pytest.param({"max_line_bytes": 12, "max_event_bytes": 20}, id="tiny-limits"),
    ],
)
def test_any_bytes_any_chunking_same_result(
    limits: dict[str, int], body: bytes, data: st.DataObject
) -> None:
    offsets = data.draw(st.lists(st.integers(0, len(body)), max_size=10))
    whole = _outcome([body], **limits)
    assert _outcome(cut(body, offsets), **limits) == whole
    assert _outcome([body[i : i + 1] for i in range(len(body))], **limits) == whole


_EOL_TEXT = re.compile("\r\n|\r|\n")


def _spec_oracle(body: bytes) -> tuple[list[Item], str, int | None]:
    """WHATWG HTML §9.2.6 transcribed naively: decode the whole body, then lines."""
    # "utf-8-sig" = Encoding's UTF-8 decode: one leading BOM stripped.
    lines = _EOL_TEXT.split(body.decode("utf-8-sig", "replace"))
    lines.pop()  # no line end: discarded at EOF
    items: list[Item] = []
    data, type_, block_id, block_retry = "", "", None, None
    last_id, retry = "", None
    for line in lines:
        if not line:
            if block_id is not None:
                last_id = block_id
            if data:
                items.append(Event(data[:-1], type_, block_id, block_retry))
            elif block_id is not None:
                items.append(IdOnly(block_id))
            data, type_, block_id, block_retry = "", "", None, None
            continue
        if line.startswith(":"):
            continue
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            data += value + "\n"
        elif name == "event":
            type_ = value
        elif name == "id" and "\0" not in value:
            block_id = value
        elif name == "retry" and re.fullmatch("[0-9]+", value, re.ASCII):
            retry = block_retry = min(int(value), MAX_RETRY_MS)
    return items, last_id, retry


@settings(max_examples=300)
@given(body=bodies)
def test_parser_agrees_with_a_naive_spec_transcription(body: bytes) -> None:
    assert _outcome([body]) == _spec_oracle(body)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("42", True, id="plain"),
        pytest.param("a b", True, id="inner-space"),
        pytest.param("…", True, id="utf8"),
        pytest.param("", False, id="empty"),
        pytest.param(" 42", False, id="leading-space"),
        pytest.param("42\t", False, id="trailing-tab"),
        pytest.param("a\x0bb", False, id="vt"),
        pytest.param("a\x0cb", False, id="ff"),
        pytest.param("a\x00b", False, id="nul"),
    ],
)
def test_resumable_id(value: str, expected: bool) -> None:
    from ssefan.core.sse import resumable_id

    assert resumable_id(value) is expected


@pytest.mark.parametrize(
    "event",
    [
        Event("plain"),
        Event("two\nlines", event="tick", id="old"),
        Event("cr\r\nlf\rmixed", event="", id=None, retry=500),
        Event("", event="x"),
    ],
)
@pytest.mark.parametrize("event_id", ["", "42", "p-1"])
def test_encode_with_id_is_encode_of_the_event_with_that_id(event: Event, event_id: str) -> None:
    assert encode_with_id(event, event_id) == encode(
        Event(event.data, event=event.event, id=event_id)
    )
