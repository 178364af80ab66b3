"""An asyncio server on 127.0.0.1 in its own thread and event loop: what the
tests' steerable apps (sse_upstream.FakeUpstream, keyed_app.KeyedApp) run on."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Self

from waits import DEFAULT_TIMEOUT


class LoopbackServer:
    """`_handle` serves each connection; `_live_writers` are aborted at close.

    It binds `self.port` (0 = any free port, then the one chosen).
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(DEFAULT_TIMEOUT)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _live_writers(self) -> list[asyncio.StreamWriter]:
        return []

    def close(self) -> None:
        if self._loop.is_closed():
            return  # closed already (a test may stop the app before the fixture does)

        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for writer in self._live_writers():
                writer.transport.abort()
            await asyncio.sleep(0)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(DEFAULT_TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(DEFAULT_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()  # else ResourceWarnings (errors under filterwarnings)
