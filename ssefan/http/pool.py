"""Keep-alive client connections to one origin (the app, or an auth endpoint), pooled.

The connections are client.py's `OriginConnection`s. After a complete
exchange that both sides left open, one goes back to the pool; idle
connections are closed after `idle_timeout`, and the pool keeps at most
`size` of them.

While a connection sits idle, the app may close it (its own keep-alive timeout)
or, worse, write a stray response (some servers send a 408 before closing).
Either marks it dead at once, so it is never handed out again: a stray byte
read as the next request's answer would be a mix-up between two clients.
A close that races with a new request is reported as `OriginClosed(early=True)`
so the caller can retry requests that are safe to repeat.
"""

from __future__ import annotations

import ssl

from ssefan.http.client import (
    Origin,
    OriginConnection,
    connect,
)

__all__ = ["ConnectionPool"]


class ConnectionPool:
    """Keep-alive connections to one origin: at most `size` idle, each for `idle_timeout`."""

    def __init__(
        self, origin: Origin, *, size: int, idle_timeout: float, connect_timeout: float
    ) -> None:
        self.origin = origin
        self.size = size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self._idle: list[OriginConnection] = []  # most recently used last
        self._ssl = ssl.create_default_context() if origin.scheme == "https" else None
        self._closed = False
        # Counters (rendered by metrics).
        self.connects = 0
        self.reuses = 0

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> OriginConnection:
        """An idle connection (most recently used first), or a new one.

        Raises TimeoutError when the connect takes longer than connect_timeout,
        OSError when it fails (refused, unreachable, TLS).
        """
        while self._idle and not fresh:
            connection = self._idle.pop()
            connection.unpark()
            if connection.alive:
                self.reuses += 1
                return connection
            connection.close()
        return await self._connect()

    async def _connect(self) -> OriginConnection:
        connection = await connect(
            self.origin, connect_timeout=self.connect_timeout, ssl_context=self._ssl, owner=self
        )
        self.connects += 1
        return connection

    def release(self, connection: OriginConnection) -> None:
        """Back to the pool if the exchange ended cleanly, else closed."""
        if self._closed or len(self._idle) >= self.size or not connection.can_be_reused():
            connection.close()
            return
        connection.park(self.idle_timeout)
        self._idle.append(connection)

    def discard(self, connection: OriginConnection) -> None:
        """An idle connection died, expired or misbehaved: forget and close it."""
        if connection in self._idle:
            self._idle.remove(connection)
        connection.idle = False
        connection.close()

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.idle = False
            connection.close()
