"""The contract between a protocol adapter and a pass-through exchange.

The HTTP/1.1 adapter (protocol.HTTPConnection) hands a request that is no
stream route to the proxy (proxy.Exchange) together with itself as a
`Downstream`: how the exchange reads the client's body, writes the response
and, after a 101, tunnels bytes. The HTTP/2 adapter offers the same for one
stream (h2stream.H2Exchange), with no tunnels.
"""

from __future__ import annotations

from typing import Protocol

import h11
from h11._util import Sentinel

__all__ = ["ClientGone", "Downstream", "Progress", "ProxyError", "ToClient"]

# What an exchange writes to the client.
ToClient = h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage


class Progress(Protocol):
    """Where the exchange stands, in h11's states: an h11.Connection for
    HTTP/1.1, h2stream.ExchangeState for an HTTP/2 stream."""

    @property
    def our_state(self) -> type[Sentinel]: ...

    @property
    def their_state(self) -> type[Sentinel]: ...

    @property
    def their_http_version(self) -> bytes | None: ...


class Downstream(Protocol):
    """The client's connection as an exchange drives it (server.HTTPConnection).

    `receive`, `drain` and `receive_raw` raise ConnectionError once the client
    is gone; `write` and `write_raw` too, when it already is.
    """

    @property
    def conn(self) -> Progress: ...  # the client-facing state machine

    peer_ip: str
    scheme: str  # "http" or "https", as the client reached ssefan

    @property
    def writing_paused(self) -> bool: ...

    @property
    def keep_alive(self) -> bool:
        """False when the connection must close after this response (a drain)."""
        ...

    async def receive(self) -> h11.Event: ...

    def write(self, event: ToClient) -> None: ...

    async def drain(self) -> None: ...

    async def receive_raw(self) -> bytes: ...

    def write_raw(self, data: bytes) -> None: ...

    def respond(
        self,
        status: int,
        body: str | bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


class ProxyError(Exception):
    """The exchange can't complete; `status` is what the client hears if it still can."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ClientGone(Exception):
    """The client closed, broke the protocol mid-body, or stopped reading."""
