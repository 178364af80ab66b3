"""Sans-I/O Server-Sent Events codec (WHATWG HTML §9.2).

No asyncio, no h11, no sockets: bytes in, values out, and values in, bytes out.

Public API (the rest of ssefan depends on exactly these names):

* ``Event(data, event="", id=None, retry=None)`` -- one dispatched event.
  ``id`` is the value of the block's own ``id`` field, or ``None`` when the
  block had none (the sticky "last event ID" is the parser's business, exposed
  as ``Parser.last_event_id``).
* ``IdOnly(id)`` -- a block that set an ``id`` (possibly ``""`` = reset) but had
  no data, so nothing fires in a browser; a re-broadcaster must still pass the
  id on (§9.2.6 dispatch step 1 runs even when no event fires).
* ``Overflow(kind, size)`` -- a line or event went over its limit; that event
  was dropped and the parser resynchronises at the next blank line.
* ``Parser(max_line_bytes=..., max_event_bytes=...)`` with
  ``feed(data: bytes) -> list[Event | IdOnly | Overflow]`` and
  ``close() -> list[Event | IdOnly | Overflow]`` (end of stream; an unfinished
  block is discarded and its id is not committed), and read-only properties
  ``last_event_id: str`` and ``retry: int | None``.
* ``encode(event: Event) -> bytes``, ``encode_id(id: str) -> bytes``,
  ``encode_comment(text: str) -> bytes``, ``encode_retry(ms: int) -> bytes``.

Error contract (the h11 split):

* Remote input never raises. Whatever bytes the upstream sends, ``feed`` and
  ``close`` return values; a peer that goes over a limit shows up as an
  ``Overflow`` item, which the caller logs and counts.
* Local misuse raises ``ValueError``: an ``Event``/``IdOnly`` built with a value
  that cannot be framed (CR/LF in ``event``/``id``, NUL in ``id``, a negative or
  non-int ``retry``), ``encode_comment`` with CR/LF, ``encode_retry`` with a bad
  number, limits < 1, or ``feed`` after ``close``. A ``str`` holding a lone
  surrogate cannot be UTF-8 encoded and makes the encoders raise
  ``UnicodeEncodeError``, which is a ``ValueError`` too.
* Anything else is a bug.

Where the parser departs from a browser, on purpose:

* Limits (the spec has none): a line longer than ``max_line_bytes`` or a data
  buffer bigger than ``max_event_bytes`` drops the whole block it is in -- its
  data, event type, ``id`` (not committed) and ``retry`` for the ``Event`` --
  and everything up to the next blank line. ``Parser.retry`` values already
  applied earlier in that block stay applied, as §9.2.6 applies ``retry`` on
  the field line itself.
* ``retry`` is clamped to ``MAX_RETRY_MS`` (24 h) so a valid but absurd value
  (``retry: 99999999999999999999``) cannot overflow a timer or hit CPython's
  int-from-string digit limit.

Past 400 lines, knowingly: the parser and the encoder are one contract (what
`encode` writes is exactly what `Parser` reads back, byte for byte, and both
follow the spec's field rules), tested together against the web-platform-tests
vectors; split, each half would restate the other's rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_RETRY_MS",
    "Event",
    "IdOnly",
    "Overflow",
    "Parser",
    "encode",
    "encode_comment",
    "encode_id",
    "encode_retry",
    "encode_with_id",
    "resumable_id",
]

_KiB: Final = 1024
_MiB: Final = 1024 * _KiB

# The spec sets no limits (wpt only ever sends 2 KiB comment lines). 1 MiB per
# line and 4 MiB per event are far above any sane SSE payload (JSON events are
# typically well under 64 KiB), yet bound what one bad or hostile upstream can
# make us pin in memory per route. They match ssefan.config.UpstreamConfig.
DEFAULT_MAX_LINE_BYTES: Final = 1 * _MiB
DEFAULT_MAX_EVENT_BYTES: Final = 4 * _MiB

# WHATWG HTML §9.2.6 accepts any run of ASCII digits as a reconnection time,
# so "retry: 99999999999999999999" is valid. Clamp so callers can hand the value
# to asyncio.sleep()/call_later() without overflow: no sane server wants a
# client to wait more than a day before reconnecting.
MAX_RETRY_MS: Final = 24 * 60 * 60 * 1000
_MAX_RETRY_DIGITS: Final = len(str(MAX_RETRY_MS))

# WHATWG HTML §9.2.6 decodes with Encoding's "UTF-8 decode": one leading BOM is stripped.
_BOM: Final = b"\xef\xbb\xbf"

# WHATWG HTML §9.2.6: a line ends at CRLF, at a lone LF, or at a lone CR.
# Alternation order matters: CRLF must win over a lone CR.
_EOL: Final = re.compile(rb"\r\n|\r|\n")


def _check_id(id: str, what: str) -> None:
    # WHATWG HTML §9.2.6: an id holding U+0000 is ignored by the parser, and CR
    # or LF would end the `id:` line early and let the value inject fields.
    # Refuse rather than strip: a stripped id would alias another id.
    if "\r" in id or "\n" in id:
        raise ValueError(f"{what} must not contain CR or LF: {id!r}")
    if "\x00" in id:
        raise ValueError(f"{what} must not contain NUL (browsers ignore such an id): {id!r}")


def _check_retry(retry: object, what: str) -> None:
    # Typed `object`: this guards callers that ignore the annotations. bool is
    # an int subclass, and `retry=True` is a bug, not 1 ms.
    if not isinstance(retry, int) or isinstance(retry, bool) or retry < 0:
        raise ValueError(f"{what} must be an int >= 0, got {retry!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event (a ``MessageEvent`` in a browser).

    Args:
        data: The data buffer with its one trailing LF removed. Any text; the
            encoder normalises CRLF and lone CR to LF.
        event: The event type; ``""`` means ``message``.
        id: This block's own ``id`` field (``""`` = reset), ``None`` if it had
            none. Not the sticky value; see ``Parser.last_event_id``.
        retry: The reconnection time in ms set in this block, or ``None``.

    Raises:
        ValueError: ``event`` or ``id`` holds CR or LF, ``id`` holds NUL, or
            ``retry`` is not an int >= 0.
    """

    data: str
    event: str = ""
    id: str | None = None
    retry: int | None = None

    def __post_init__(self) -> None:
        if "\r" in self.event or "\n" in self.event:
            raise ValueError(f"Event.event must not contain CR or LF: {self.event!r}")
        if self.id is not None:
            _check_id(self.id, "Event.id")
        if self.retry is not None:
            _check_retry(self.retry, "Event.retry")


@dataclass(frozen=True, slots=True)
class IdOnly:
    """A block that set ``id`` but had no data: nothing fires, the id moves.

    WHATWG HTML §9.2.6 dispatch step 1 commits the last event ID before step 2
    returns early on an empty data buffer, so a browser's ``lastEventId`` (and
    its ``Last-Event-ID`` on reconnect) changes. A re-broadcaster must pass it
    on, e.g. as ``encode_id(item.id)``.

    Raises:
        ValueError: ``id`` holds CR, LF or NUL.
    """

    id: str

    def __post_init__(self) -> None:
        _check_id(self.id, "IdOnly.id")


@dataclass(frozen=True, slots=True)
class Overflow:
    """The upstream went over a limit; the block it was in was dropped.

    ``kind`` is ``"line"`` when one line was longer than ``max_line_bytes``;
    ``size`` is then ``max_line_bytes + 1``: the parser stops counting as soon
    as a line is known to be too long and discards the rest unread, which keeps
    the report prompt (a never-ending line is reported too) and independent of
    how the input was chunked.

    ``kind`` is ``"event"`` when the block's data buffer grew past
    ``max_event_bytes``; ``size`` is the byte size it reached with the line that
    crossed the limit (raw value bytes plus one per LF).
    """

    kind: Literal["line", "event"]
    size: int


def _parse_retry(value: bytes) -> int | None:
    # WHATWG HTML §9.2.6: "If the field value consists of only ASCII digits"; an
    # empty value is ignored (Chromium resets instead; the spec text does not).
    # bytes.isdigit() is ASCII-only, unlike str.isdigit() which accepts "٣"
    # and "²", and int() which accepts "+5", " 5 " and "1_000" (pitfall P2).
    if not value.isdigit():
        return None
    # Leading zeros are decimal ("03000" = 3000). Strip them before the length
    # check so that many zeros don't read as huge, and so int() never sees more
    # digits than CPython's int_max_str_digits allows.
    digits = value.lstrip(b"0")
    if len(digits) > _MAX_RETRY_DIGITS:
        return MAX_RETRY_MS
    return min(int(digits or b"0"), MAX_RETRY_MS)


class Parser:
    """Incremental WHATWG HTML §9.2.6 event-stream parser for one response body.

    Feed it bytes as they arrive, in chunks of any size; it gives the same
    items however the body is split. Use one instance per upstream response:
    the leading-BOM rule applies once per instance. The parser never raises on
    input bytes.

    Args:
        max_line_bytes: Longest line accepted, in bytes, without its line end.
            Also bounds the buffered partial line.
        max_event_bytes: Largest data buffer accepted per block, in bytes.

    Raises:
        ValueError: a limit is < 1.
    """

    __slots__ = (
        "_block_id",
        "_block_retry",
        "_bom_pending",
        "_buf",
        "_closed",
        "_data",
        "_data_size",
        "_event",
        "_last_event_id",
        "_max_event",
        "_max_line",
        "_resync",
        "_retry",
        "_skip_lf",
        "_skip_line",
    )

    def __init__(
        self,
        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
    ) -> None:
        if max_line_bytes < 1 or max_event_bytes < 1:
            raise ValueError(
                f"limits must be >= 1, got max_line_bytes={max_line_bytes!r}, "
                f"max_event_bytes={max_event_bytes!r}"
            )
        self._max_line = max_line_bytes
        self._max_event = max_event_bytes
        # Framing state.
        self._buf = bytearray()  # the unterminated last line, <= max_line bytes
        self._skip_lf = False  # last feed ended in CR: drop an LF that starts the next
        self._bom_pending = True  # no 3 bytes seen yet: a BOM may still be arriving
        self._skip_line = False  # the current partial line is being discarded unread
        self._resync = False  # over a limit: ignore lines until the next blank line
        self._closed = False
        # The block being parsed (§9.2.6 data and event type buffers, plus what
        # this block set itself, which the spec folds into shared buffers).
        self._data: list[bytes] = []
        self._data_size = 0
        self._event = ""
        self._block_id: str | None = None
        self._block_retry: int | None = None
        # Committed, stream-wide state.
        self._last_event_id = ""
        self._retry: int | None = None

    @property
    def last_event_id(self) -> str:
        """The sticky last event ID, as committed at the last dispatch (§9.2.6 step 1)."""
        return self._last_event_id

    @property
    def retry(self) -> int | None:
        """The last valid ``retry`` seen, in ms, clamped to ``MAX_RETRY_MS``."""
        return self._retry

    def feed(self, data: bytes) -> list[Event | IdOnly | Overflow]:
        """Parse the next chunk of the body.

        Returns:
            The items completed by this chunk, in stream order.

        Raises:
            ValueError: called after ``close()``.
        """
        if self._closed:
            raise ValueError("Parser.feed() called after close()")
        out: list[Event | IdOnly | Overflow] = []
        if not data:
            return out
        if self._skip_lf:
            # WHATWG HTML §9.2.6: CRLF is one line end. The CR already ended the
            # line (waiting for the next byte would stall CR-only streams), so
            # an LF that opens this chunk is the rest of that CRLF, not a blank
            # line.
            self._skip_lf = False
            if data[0] == 0x0A:
                data = data[1:]
                if not data:
                    return out
        if self._bom_pending:
            # WHATWG HTML §9.2.6 decodes with Encoding's "UTF-8 decode", which
            # strips one BOM at body start only, even when it arrives split
            # over several chunks (so buffer up to 3 bytes until we know).
            head = bytes(self._buf) + data
            if len(head) < len(_BOM) and _BOM.startswith(head):
                self._buf[:] = head
                return out
            self._bom_pending = False
            self._buf.clear()
            data = head[len(_BOM) :] if head.startswith(_BOM) else head
            if not data:
                return out

        if b"\r" in data:
            lines = _EOL.split(data)
            # A CR at the very end ends its line now; remember to swallow the LF.
            self._skip_lf = data[-1] == 0x0D
        else:
            lines = data.split(b"\n")  # the common case, at C speed
        partial = lines.pop()

        if lines:
            first = lines[0]
            if self._skip_line:
                # The over-long line ends here; its bytes are gone and it was
                # not blank. Nothing to do but stop skipping.
                self._skip_line = False
                del lines[0]
            elif self._buf:
                self._buf += first
                lines[0] = bytes(self._buf)
                self._buf.clear()
            max_line = self._max_line
            for line in lines:
                if not line:
                    # WHATWG HTML §9.2.6: "If the line is empty (a blank line)
                    # -> Dispatch the event".
                    if self._resync:
                        self._resync = False  # the dropped block ends here
                    else:
                        self._dispatch(out)
                elif self._resync:
                    pass
                elif len(line) > max_line:
                    self._overflow(out, Overflow("line", max_line + 1))
                else:
                    self._process_line(line, out)

        if partial and not self._skip_line:
            if self._resync:
                # Only "is it blank?" matters until the next blank line, and a
                # line with bytes in it is not: keep none of them.
                self._skip_line = True
            elif len(self._buf) + len(partial) > self._max_line:
                # Check the unterminated line too, so a never-ending line cannot
                # grow the buffer past the limit.
                self._overflow(out, Overflow("line", self._max_line + 1))
                self._buf.clear()
                self._skip_line = True
            else:
                self._buf += partial
        return out

    def close(self) -> list[Event | IdOnly | Overflow]:
        """Signal the end of the body. Idempotent.

        WHATWG HTML §9.2.6: "Once the end of the file is reached, any pending
        data must be discarded" -- a block without its blank line never fires,
        and its ``id`` is never committed (wpt
        format-data-before-final-empty-line). So this returns no items; it
        exists so the end of a stream is explicit and the parser can't be fed
        past it.
        """
        self._closed = True
        self._buf.clear()
        self._skip_line = self._resync = self._skip_lf = False
        self._reset_block()
        return []

    def _reset_block(self) -> None:
        # WHATWG HTML §9.2.6 dispatch steps 2 and 7: the data and event type
        # buffers are cleared; the event type is not sticky.
        self._data = []
        self._data_size = 0
        self._event = ""
        self._block_id = None
        self._block_retry = None

    def _overflow(self, out: list[Event | IdOnly | Overflow], item: Overflow) -> None:
        out.append(item)
        self._reset_block()
        self._resync = True

    def _dispatch(self, out: list[Event | IdOnly | Overflow]) -> None:
        block_id = self._block_id
        if block_id is not None:
            # WHATWG HTML §9.2.6 dispatch step 1: the last event ID string is
            # set even when no event fires (step 2 returns after it).
            self._last_event_id = block_id
        data = self._data
        if data:
            # Step 3 removes the one trailing LF that the last `data` line
            # appended; joining on LF is exactly that. CR and LF never occur
            # inside a UTF-8 sequence, so decoding the joined bytes equals
            # decoding the whole body and splitting it (errors="replace" is
            # WHATWG's maximal-subpart U+FFFD replacement).
            raw = data[0] if len(data) == 1 else b"\n".join(data)
            out.append(
                Event(raw.decode("utf-8", "replace"), self._event, block_id, self._block_retry)
            )
        elif block_id is not None:
            # Step 2: an empty data buffer fires nothing, but the id moved.
            out.append(IdOnly(block_id))
        self._reset_block()

    def _process_line(self, line: bytes, out: list[Event | IdOnly | Overflow]) -> None:
        colon = line.find(b":")
        if colon == 0:
            # WHATWG HTML §9.2.6: "If the line starts with a U+003A COLON
            # character (:) -> Ignore the line."
            return
        if colon < 0:
            # "Otherwise, the string is not empty but does not contain a U+003A
            # COLON character": the whole line is the field name, value "".
            name = line
            value = b""
        else:
            # Field is everything before the first colon; "If value starts with
            # a U+0020 SPACE character, remove it" -- exactly one, not a tab.
            name = line[:colon]
            value = line[colon + 2 :] if line.startswith(b" ", colon + 1) else line[colon + 1 :]
        # Names are compared on bytes: only the bytes b"data" decode to "data"
        # (U+FFFD is not ASCII), so this equals the spec's comparison after
        # decoding, case-sensitively.
        if name == b"data":
            # "Append the field value to the data buffer, then append a single
            # U+000A LINE FEED (LF) character".
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_event:
                self._overflow(out, Overflow("event", self._data_size))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            # "If the field value does not contain U+0000 NULL, then set the
            # last event ID buffer to the field value. Otherwise, ignore the
            # field." Only a 0x00 byte decodes to U+0000.
            if b"\x00" not in value:
                self._block_id = value.decode("utf-8", "replace")
        elif name == b"retry":
            retry = _parse_retry(value)
            if retry is not None:
                # Applied at once (the spec sets the reconnection time on the
                # field line, not at dispatch); a bogus value changes nothing.
                self._retry = self._block_retry = retry
        # "Otherwise: The field is ignored."


def encode(event: Event) -> bytes:
    """Frame one event canonically.

    Field order is ``id``, ``event``, ``retry``, then one ``data: `` line per
    LF-separated piece of ``data``, then the blank line. ``id`` is written when
    not ``None`` (``""`` as ``id:``, which resets a client's last event ID);
    ``event`` when not ``""``; ``retry`` when not ``None``. ``data`` always gets
    at least one line, so empty data still fires (``data: \\n``). Values are
    written after ``": "`` so a leading space survives the parser's one-space
    strip. CRLF and lone CR in ``data`` become LF, so no value can end the
    event early or inject fields: ``parse(encode(e))`` is ``e`` with its data
    so normalised.

    Raises:
        UnicodeEncodeError: a value holds a lone surrogate (a ``ValueError``).
    """
    return _frame(event.data, event.event, event.id, event.retry)


def encode_with_id(event: Event, event_id: str) -> bytes:
    """``encode(Event(event.data, event=event.event, id=event_id))``, without
    building (and validating) that Event: the intake re-encodes every upstream
    event under the id clients get, and an Event's checks cost five times its
    encoding. `event_id` must already be a valid id (no CR, LF or NUL): the
    parser's or one ssefan assigned. ``retry`` is not written.
    """
    return _frame(event.data, event.event, event_id, None)


def _frame(data: str, event_type: str, event_id: str | None, retry: int | None) -> bytes:
    if "\r" in data:
        data = data.replace("\r\n", "\n").replace("\r", "\n")
    if "\n" in data:
        data = data.replace("\n", "\ndata: ")
    head = ""
    if event_id is not None:
        head = f"id: {event_id}\n" if event_id else "id:\n"
    if event_type:
        head += f"event: {event_type}\n"
    if retry is not None:
        head += f"retry: {retry}\n"
    return f"{head}data: {data}\n\n".encode()


def encode_id(id: str) -> bytes:
    """Frame an id-only block (``id: x\\n\\n``; ``id:\\n\\n`` for a reset).

    No event fires in a browser, but its last event ID moves (§9.2.6 dispatch
    step 1).

    Raises:
        ValueError: ``id`` holds CR, LF or NUL.
    """
    _check_id(id, "id")
    return f"id: {id}\n\n".encode() if id else b"id:\n\n"


def encode_comment(text: str) -> bytes:
    """Frame a comment block (``: text\\n\\n``; ``:\\n\\n`` for empty text).

    Browsers ignore it (§9.2.6); it keeps idle proxies from closing the stream
    (§9.2.7). The trailing blank line makes it safe between any two events.

    Raises:
        ValueError: ``text`` holds CR or LF (it would end the comment early).
    """
    if "\r" in text or "\n" in text:
        raise ValueError(f"comment must not contain CR or LF: {text!r}")
    return f": {text}\n\n".encode() if text else b":\n\n"


def encode_retry(ms: int) -> bytes:
    """Frame a retry-only block (``retry: ms\\n\\n``): sets the reconnection time.

    Raises:
        ValueError: ``ms`` is not an int >= 0.
    """
    _check_retry(ms, "retry")
    return b"retry: %d\n\n" % ms


def resumable_id(value: str) -> bool:
    """Can `value` travel back as a `Last-Event-ID` header and still match?

    WHATWG HTML §9.2.4 sends the last event ID verbatim on reconnect, but HTTP
    (RFC 9110 §5.5) strips leading/trailing whitespace from field values and
    h11 refuses NUL, VT and FF in them: such an id is legal SSE yet a client
    could never resume from it.
    """
    if not value or value != value.strip(" \t"):
        return False
    return not any(c in value for c in "\x00\x0b\x0c\r\n")
