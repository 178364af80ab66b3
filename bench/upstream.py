"""The synthetic upstream: an SSE app (and nchan publisher) with a steerable rate.

Run as its own process: ``python -m bench.upstream [--publish-to URL]``. It
prints ``upstream listening on PORT`` and serves, on 127.0.0.1 only:

* ``GET /events`` -- an SSE stream. Event ``n`` has ``id: n`` and data
  ``"<n> <monotonic_ns at publish> xxxx..."`` padded to ``--size`` bytes. A
  ``Last-Event-ID`` resumes after that id from a bounded history. Each
  connection is served by its own coroutine that formats every event for itself:
  the per-connection cost of a typical app endpoint, which is what the *naive*
  baseline (clients straight to the app) measures.
* ``GET /control?rate=R`` -- publish R events per second from now on (0 pauses);
  answers the same JSON as ``GET /stats``: the last published sequence number,
  open/peak/accepted stream counts and the nchan publisher's counters.

With ``--publish-to http://127.0.0.1:PORT/pub`` every event is also POSTed to an
nchan publisher location, pipelined on one keep-alive connection so events stay
in order and the publish rate does not depend on nchan's answer time.

``time.monotonic_ns`` is CLOCK_MONOTONIC, shared by every process on the
machine, so receivers compute publish-to-receive latency from it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from urllib.parse import parse_qs, urlsplit

from .common import HOST, raise_nofile

__all__ = ["SyntheticUpstream", "main"]

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
)
# The longest burst the ticker publishes in one go when it fell behind schedule
# (a saturated naive upstream): the offered rate stays honest, the loop responsive.
MAX_BURST = 1000


class NchanPublisher:
    """POSTs each event to nchan's publisher location, pipelined, in order."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path or "/"
        self.sent = 0
        self.acked = 0
        self.errors = 0
        self.statuses: dict[int, int] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def send(self, data: str) -> None:
        body = data.encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        if self._writer is None or self._writer.is_closing():
            self.errors += 1
            return
        self._writer.write(head.encode() + body)
        self.sent += 1

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split()[1])
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                self.acked += 1
                self.statuses[status] = self.statuses.get(status, 0) + 1
                if status not in (200, 201, 202):
                    self.errors += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            self.errors += 1
            print("upstream: nchan publisher connection closed", file=sys.stderr, flush=True)

    def stats(self) -> dict[str, object]:
        return {
            "sent": self.sent,
            "acked": self.acked,
            "errors": self.errors,
            "statuses": {str(k): v for k, v in self.statuses.items()},
        }


class SyntheticUpstream:
    def __init__(self, *, size: int, history: int, publisher: NchanPublisher | None) -> None:
        self.size = size
        self.history = history
        self.publisher = publisher
        self.seq = 0
        self.rate = 0.0
        self.events: dict[int, str] = {}
        self.streams = 0
        self.peak_streams = 0
        self.accepted_streams = 0
        self.rate_since = time.monotonic()
        self.published_at_rate_change = 0
        self._next: asyncio.Future[None] | None = None
        self._server: asyncio.Server | None = None

    # -- publishing -----------------------------------------------------------

    def _data(self, seq: int) -> str:
        head = f"{seq} {time.monotonic_ns()} "
        return head + "x" * max(1, self.size - len(head))

    def publish(self) -> None:
        self.seq += 1
        seq = self.seq
        data = self._data(seq)
        self.events[seq] = data
        self.events.pop(seq - self.history, None)
        if self.publisher is not None:
            self.publisher.send(data)
        fut = self._next
        if fut is not None:
            self._next = None
            fut.set_result(None)

    def wait_next(self) -> asyncio.Future[None]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return self._next

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self.rate_since = time.monotonic()
        self.published_at_rate_change = self.seq

    async def ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rate = self.rate
            if rate <= 0:
                await asyncio.sleep(0.02)
                continue
            start, sent = loop.time(), 0
            while self.rate == rate:
                due = int((loop.time() - start) * rate) + 1
                burst = min(due - sent, MAX_BURST)
                for _ in range(burst):
                    self.publish()
                sent += burst
                delay = start + sent / rate - loop.time()
                await asyncio.sleep(min(max(delay, 0.0), 0.1))

    # -- serving --------------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, HOST, port, backlog=4096)
        return int(self._server.sockets[0].getsockname()[1])

    def stats(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "seq": self.seq,
            "rate": self.rate,
            "streams": self.streams,
            "peak_streams": self.peak_streams,
            "accepted_streams": self.accepted_streams,
            "publisher": self.publisher.stats() if self.publisher else None,
        }

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        target = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
        parts = urlsplit(target)
        if parts.path == "/events":
            last = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "last-event-id":
                    last = value.strip()
            await self._stream(writer, int(last) if last.isdigit() else None)
            return
        if parts.path == "/control":
            query = parse_qs(parts.query)
            if "rate" in query:
                self.set_rate(float(query["rate"][0]))
        body = json.dumps(self.stats()).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body)
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _stream(self, writer: asyncio.StreamWriter, last_id: int | None) -> None:
        cursor = last_id + 1 if last_id is not None else self.seq + 1
        self.streams += 1
        self.accepted_streams += 1
        self.peak_streams = max(self.peak_streams, self.streams)
        writer.write(STREAM_HEAD)
        events = self.events
        try:
            while True:
                if writer.is_closing():
                    break
                if cursor > self.seq:
                    await self.wait_next()
                    continue
                cursor = max(cursor, self.seq - self.history + 1)
                # Per-connection formatting: the naive app's cost per client.
                out = []
                while cursor <= self.seq:
                    out.append(f"id: {cursor}\ndata: {events[cursor]}\n\n".encode())
                    cursor += 1
                writer.write(b"".join(out))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.streams -= 1
            writer.close()


async def _main(args: argparse.Namespace) -> None:
    publisher = NchanPublisher(args.publish_to) if args.publish_to else None
    upstream = SyntheticUpstream(size=args.size, history=args.history, publisher=publisher)
    if publisher is not None:
        await publisher.connect()
    port = await upstream.start(args.port)
    ticker = asyncio.get_running_loop().create_task(upstream.ticker())
    print(f"upstream listening on {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    ticker.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--size", type=int, default=200, help="event data bytes")
    parser.add_argument("--history", type=int, default=2000, help="events kept for resume")
    parser.add_argument("--publish-to", default="", help="nchan publisher URL (POST per event)")
    args = parser.parse_args(argv)
    raise_nofile()
    import uvloop

    uvloop.run(_main(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
