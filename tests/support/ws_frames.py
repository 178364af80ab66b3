"""A minimal WebSocket frame codec (RFC 6455), for both ends of the pass-through tests' /ws.

The test app (`app_server`) answers with it; the tests speak it as the client
over a raw socket, so what ssefan relays after the 101 is checked byte by byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import struct
from typing import Protocol

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3


def ws_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final frame (RFC 6455 §5.2); clients must mask, servers must not."""
    head = bytes([0x80 | opcode])
    mask_bit = 0x80 if mask else 0
    n = len(payload)
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def read_ws_frame(read: _Read) -> tuple[int, bytes] | None:
    head = read(2)
    if len(head) < 2:
        return None
    opcode, masked, n = head[0] & 0x0F, head[1] & 0x80, head[1] & 0x7F
    if n == 126:
        n = struct.unpack("!H", read(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read(8))[0]
    key = read(4) if masked else b""
    payload = read(n)
    if masked:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return opcode, payload


class _Read(Protocol):
    def __call__(self, n: int, /) -> bytes: ...


def recv_exactly(sock: socket.socket, buffer: bytearray) -> _Read:
    """A read(n) over a socket with `buffer` holding bytes already received."""

    def read(n: int) -> bytes:
        while len(buffer) < n:
            data = sock.recv(65536)
            if not data:
                break
            buffer.extend(data)
        out = bytes(buffer[:n])
        del buffer[:n]
        return out

    return read


def ws_accept(key: bytes) -> str:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
