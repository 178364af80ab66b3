"""A byte tunnel after a protocol switch (101: WebSocket and the like).

Both directions are copied until either side closes (as nginx does for
upgraded connections), an error, or `idle` seconds without a byte in either
direction; each write waits for the reader to take the previous bytes, so a
tunnel costs a window of memory however fast one side sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ssefan.edge.downstream import Downstream
from ssefan.http.client import OriginConnection

__all__ = ["tunnel"]


async def tunnel(client: Downstream, origin: OriginConnection, idle: float) -> str:
    """Run the tunnel; returns why it ended. Closes both sides."""
    loop = asyncio.get_running_loop()
    last_activity = [loop.time()]  # either direction's last byte

    async def pump(
        read: Callable[[], Awaitable[bytes]],
        write: Callable[[bytes], None],
        to_origin: bool,
    ) -> str:
        while True:
            try:
                async with asyncio.timeout(idle):
                    data = await read()
            except TimeoutError:
                if loop.time() - last_activity[0] < idle:
                    continue  # the other direction is busy: the tunnel is alive
                return f"idle for {idle:g}s"
            except (ConnectionError, OSError) as exc:
                return f"read failed: {type(exc).__name__}"
            if not data:
                return "eof"
            last_activity[0] = loop.time()
            try:
                write(data)
                if origin.writing_paused if to_origin else client.writing_paused:
                    async with asyncio.timeout(idle):
                        await (origin.drain() if to_origin else client.drain())
            except TimeoutError:
                return f"peer stopped reading for {idle:g}s"
            except (ConnectionError, OSError) as exc:
                return f"write failed: {type(exc).__name__}"

    pumps = [
        asyncio.create_task(pump(client.receive_raw, origin.write_raw, True)),
        asyncio.create_task(pump(origin.receive_raw, client.write_raw, False)),
    ]
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        return next(iter(done)).result()
    finally:
        for each in pumps:
            each.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        origin.close()
        if client.writing_paused:
            client.abort()  # a stuck client would never flush a graceful close
        else:
            client.close()
