"""HTTP responses, sans-I/O: building heads and bodies, recognising an event stream.

One place for what the server, the admin endpoint, the pass-through proxy and
the upstream client would otherwise each write for themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus

import h11

from ssefan.http.forwarding import Header

__all__ = ["MAX_RESPONSE_HEAD", "is_event_stream", "raw_response", "response_head"]

# h11's bound on a response head from the app (the upstream stream, a
# pass-through or a forward-auth answer). 64 KiB leaves room for large
# Set-Cookie and CSP headers; nothing legitimate comes close.
MAX_RESPONSE_HEAD = 64 * 1024


def response_head(status: int, headers: list[Header]) -> h11.Response:
    """An h11 response head with the status's standard reason phrase."""
    return h11.Response(status_code=status, headers=headers, reason=HTTPStatus(status).phrase)


def raw_response(status: int, body: str, extra: Sequence[Header] = ()) -> bytes:
    """A complete plain-text `Connection: close` response, built without h11.

    For where h11 can no longer frame an answer: the request head was malformed
    or never finished, or h11 refused the head we tried to send.
    """
    payload = body.encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode("ascii"),
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(payload),
        b"connection: close",
        *[name + b": " + value for name, value in extra],
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + payload


def is_event_stream(content_type: bytes) -> bool:
    """Whether a Content-Type value names `text/event-stream`."""
    # WHATWG: compare the MIME type's essence; parameters and a trailing ';' are fine.
    essence = content_type.split(b";", 1)[0].strip().lower()
    return essence == b"text/event-stream"
