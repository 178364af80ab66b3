"""The "typical Python" baseline: sse-starlette under uvicorn.

What a Python team writes without ssefan: one task subscribes to the app's
stream (httpx + httpx-sse) and broadcasts each event in-process to one
``asyncio.Queue`` per client; every client's generator formats its own copy
through sse-starlette's ``EventSourceResponse``. A short history (a deque)
serves ``Last-Event-ID`` so the reconnect storm can be compared; the replay
snapshot and the queue registration happen in one step, so no event is lost or
doubled at the hand-over.

Run: ``python -m bench.starlette_app --upstream URL`` -- prints
``starlette listening on PORT`` (127.0.0.1, a free port) and serves ``/events``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import uvicorn
from httpx_sse import aconnect_sse
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route

from .common import HOST, raise_nofile

__all__ = ["main"]

HISTORY = 1000

Item = tuple[int, str]


class Broadcast:
    def __init__(self) -> None:
        self.queues: set[asyncio.Queue[Item]] = set()
        self.history: collections.deque[Item] = collections.deque(maxlen=HISTORY)

    def publish(self, seq: int, data: str) -> None:
        item = (seq, data)
        self.history.append(item)
        for queue in self.queues:
            queue.put_nowait(item)

    def since(self, last_id: str | None) -> list[Item]:
        if last_id is None or not last_id.isdigit():
            return []
        last = int(last_id)
        return [item for item in self.history if item[0] > last]


broadcast = Broadcast()
UPSTREAM_URL = ""


async def follow_upstream(url: str) -> None:
    last: str | None = None
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0)) as client:
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                async with aconnect_sse(client, "GET", url, headers=headers) as source:
                    async for sse in source.aiter_sse():
                        if sse.id:
                            last = sse.id
                            broadcast.publish(int(sse.id), sse.data)
            except httpx.HTTPError:
                await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(follow_upstream(UPSTREAM_URL))
    try:
        yield
    finally:
        task.cancel()


async def events(request: Request) -> EventSourceResponse:
    queue: asyncio.Queue[Item] = asyncio.Queue()
    backlog = broadcast.since(request.headers.get("last-event-id"))
    broadcast.queues.add(queue)

    async def stream() -> AsyncIterator[dict[str, str]]:
        try:
            for seq, data in backlog:
                yield {"id": str(seq), "data": data}
            while True:
                seq, data = await queue.get()
                yield {"id": str(seq), "data": data}
        finally:
            broadcast.queues.discard(queue)

    return EventSourceResponse(stream())


app = Starlette(routes=[Route("/events", events)], lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    global UPSTREAM_URL
    parser = argparse.ArgumentParser(prog="python -m bench.starlette_app")
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    UPSTREAM_URL = args.upstream
    raise_nofile()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, args.port))
    print(f"starlette listening on {sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        log_level="warning",
        access_log=False,
        backlog=4096,
        timeout_graceful_shutdown=1,
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
