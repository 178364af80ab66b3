"""How event bytes are framed for a client's connection: HTTP/1.1 chunks now.

A stream to an HTTP/1.1 client is a chunked body (RFC 9112 §7.1): each write
is `<hex length>\\r\\n<bytes>\\r\\n`, and a zero-length chunk ends the body. An
HTTP/1.0 client's stream is close-delimited and needs no framing at all.
HTTP/2 DATA frames will be the next kind here; the fan-out builds each kind's
framing once per batch and shares it (DESIGN.md: frame once).

No asyncio, no sockets: bytes in, bytes out.
"""

from __future__ import annotations

__all__ = ["TERMINAL_CHUNK", "chunk"]

# RFC 9112 §7.1: the last chunk (size 0) and the empty trailer section. It
# lets the client see a clean end of the body rather than a cut connection.
TERMINAL_CHUNK = b"0\r\n\r\n"


def chunk(payload: bytes) -> bytes:
    """`payload` as one HTTP/1.1 chunk."""
    return b"%x\r\n%b\r\n" % (len(payload), payload)
