"""The shared HTTP response kit: event-stream recognition and the raw answers."""

from __future__ import annotations

import h11
import pytest

from ssefan.http.forwarding import describe_exception
from ssefan.http.responses import is_event_stream, raw_response, response_head


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        pytest.param(b"text/event-stream", True, id="bare"),
        pytest.param(b"text/event-stream; charset=utf-8", True, id="parameter"),
        pytest.param(b"Text/Event-Stream", True, id="case"),
        pytest.param(b" text/event-stream ;", True, id="spaces-trailing-semicolon"),
        pytest.param(b"text/event-streams", False, id="longer-essence"),
        pytest.param(b"text/plain", False, id="other-type"),
        pytest.param(b"", False, id="none"),
    ],
)
def test_is_event_stream_compares_the_essence(content_type: bytes, expected: bool) -> None:
    assert is_event_stream(content_type) is expected


def test_raw_response_is_a_complete_closing_answer() -> None:
    out = raw_response(400, "bad\n", [(b"x-request-id", b"abc")])
    assert out == (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"content-type: text/plain; charset=utf-8\r\n"
        b"content-length: 4\r\n"
        b"connection: close\r\n"
        b"x-request-id: abc\r\n"
        b"\r\n"
        b"bad\n"
    )


def test_response_head_carries_the_standard_reason() -> None:
    head = response_head(503, [(b"content-length", b"0")])
    assert (head.status_code, head.reason) == (503, b"Service Unavailable")
    assert isinstance(head, h11.Response)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(
            ConnectionResetError(104, "reset"),
            "ConnectionResetError: [Errno 104] reset",
            id="message",
        ),
        pytest.param(TimeoutError(), "TimeoutError", id="no-message"),
    ],
)
def test_describe_exception(exc: BaseException, expected: str) -> None:
    assert describe_exception(exc) == expected
