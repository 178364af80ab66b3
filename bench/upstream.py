"""The synthetic upstream: an SSE app (and nchan publisher) with a steerable rate.

Run as its own process: ``python -m bench.upstream [--publish-to URL]``. It
prints ``upstream listening on PORT`` and serves, on 127.0.0.1 only:

* ``GET /events`` -- an SSE stream. Event ``n`` has ``id: n`` and data
  ``"<n> <monotonic_ns at publish> xxxx..."`` padded to ``--size`` bytes. A
  ``Last-Event-ID`` resumes after that id from a bounded history. Each
  connection is served by its own coroutine that formats every event for itself:
  the per-connection cost of a typical app endpoint, which is what the *naive*
  baseline (clients straight to the app) measures.
* ``GET /jobs/<key>/progress`` -- the same, per key (what a template route
  subscribes to): each key is its own feed with its own sequence (event ``n``
  of a key has ``id: n``) and history, and its data carries the key
  (``"<n> <ns> <key> xxxx..."``) so a client can tell another key's event.
* ``GET /control?rate=R[&keys=K]`` -- publish R events per second *per key*
  from now on (0 pauses), on ``/events`` alone or, with ``keys=K``, on the keys
  ``k0 .. k<K-1>`` (round robin, so the keys' events are evenly spread in
  time); answers the same JSON as ``GET /stats``: events published, each
  publishing key's sequence number, open/peak/accepted stream counts (in all
  and per key) and the nchan publisher's counters.

With ``--publish-to http://127.0.0.1:PORT/pub`` every event is also POSTed to an
nchan publisher location (``/pub/<key>`` for a key), pipelined on one keep-alive
connection so events stay in order and the publish rate does not depend on
nchan's answer time.

Every open stream gets an SSE comment every ``HEARTBEAT`` seconds, as a
well-behaved app sends, so an idle stream is never taken for a dead one by the
server's read-idle watchdog.

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
from collections.abc import Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from .common import HOST, key_name, raise_nofile

__all__ = ["Feed", "SyntheticUpstream", "main"]

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
)
# The longest burst the ticker publishes in one go when it fell behind schedule
# (a saturated naive upstream): the offered rate stays honest, the loop responsive.
MAX_BURST = 1000
# The ticker sleeps at least this long between bursts: at 10 000 events/s (1000
# keys x 10/s) a sleep per event would cost more than the events themselves.
# Events are time-stamped when published, so this jitter is not latency.
MIN_TICK = 0.002
# Comment lines on every open stream this often: below ssefan's 45 s read-idle
# watchdog, like the 15 s heartbeats most SSE apps send.
HEARTBEAT = 15.0
HEARTBEAT_BYTES = b": hb\n\n"
# Events a key keeps for Last-Event-ID (the static feed keeps --history): a
# key's feed is small, and 10 000 keys must not hold 2000 events each.
KEY_HISTORY = 200
KEY_PREFIX = "/jobs/"
KEY_SUFFIX = "/progress"


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

    def send(self, data: str, key: str = "") -> None:
        body = data.encode()
        path = f"{self.path}/{key}" if key else self.path
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
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


class Feed:
    """One stream source: the static ``/events`` (key "") or one key's progress."""

    __slots__ = ("accepted", "events", "history", "key", "peak", "seq", "streams", "tag", "waiter")

    def __init__(self, key: str, history: int) -> None:
        self.key = key
        self.history = history
        # In a key's data, after the sequence number and publish time.
        self.tag = f"{key} " if key else ""
        self.seq = 0
        self.events: dict[int, str] = {}
        self.waiter: asyncio.Future[None] | None = None
        self.streams = 0
        self.peak = 0
        self.accepted = 0

    def wait_next(self) -> asyncio.Future[None]:
        if self.waiter is None:
            self.waiter = asyncio.get_running_loop().create_future()
        return self.waiter


class SyntheticUpstream:
    def __init__(self, *, size: int, history: int, publisher: NchanPublisher | None) -> None:
        self.size = size
        self.history = history
        self.publisher = publisher
        self.feeds: dict[str, Feed] = {"": Feed("", history)}
        # The feeds the ticker publishes on, round robin (the static one, or k0..kK-1).
        self.publishing: list[Feed] = [self.feeds[""]]
        self.published = 0
        self.rate = 0.0
        self.streams = 0
        self.peak_streams = 0
        self.accepted_streams = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    # -- publishing -----------------------------------------------------------

    def feed(self, key: str) -> Feed:
        feed = self.feeds.get(key)
        if feed is None:
            feed = self.feeds[key] = Feed(key, KEY_HISTORY)
        return feed

    def _data(self, feed: Feed, seq: int) -> str:
        head = f"{seq} {time.monotonic_ns()} {feed.tag}"
        return head + "x" * max(1, self.size - len(head))

    def publish(self, feed: Feed) -> None:
        feed.seq += 1
        self.published += 1
        seq = feed.seq
        data = self._data(feed, seq)
        feed.events[seq] = data
        feed.events.pop(seq - feed.history, None)
        if self.publisher is not None:
            self.publisher.send(data, feed.key)
        fut = feed.waiter
        if fut is not None:
            feed.waiter = None
            fut.set_result(None)

    def set_rate(self, rate: float, keys: int | None = None) -> None:
        if keys is not None:
            self.publishing = (
                [self.feed(key_name(i)) for i in range(keys)] if keys else [self.feeds[""]]
            )
        self.rate = rate

    def _round_robin(self) -> Iterator[Feed]:
        while True:
            yield from self.publishing

    async def ticker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            rate, publishing = self.rate, self.publishing
            if rate <= 0 or not publishing:
                await asyncio.sleep(0.02)
                continue
            # Per key: R events/s, so the ticker's own rate is R x keys.
            total = rate * len(publishing)
            feeds = self._round_robin()
            start, sent = loop.time(), 0
            while self.rate == rate and self.publishing is publishing:
                due = int((loop.time() - start) * total) + 1
                burst = min(due - sent, MAX_BURST)
                for _ in range(burst):
                    self.publish(next(feeds))
                sent += burst
                delay = start + sent / total - loop.time()
                await asyncio.sleep(min(max(delay, MIN_TICK), 0.1))

    async def heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            for writer in list(self.writers):
                if not writer.is_closing():
                    writer.write(HEARTBEAT_BYTES)

    # -- serving --------------------------------------------------------------

    async def start(self, port: int = 0) -> int:
        self._server = await asyncio.start_server(self._handle, HOST, port, backlog=4096)
        return int(self._server.sockets[0].getsockname()[1])

    def stats(self) -> dict[str, object]:
        keyed = [f for key, f in self.feeds.items() if key]
        return {
            "pid": os.getpid(),
            # Events published on all feeds (the static feed alone: its sequence).
            "seq": self.published,
            "key_seqs": [f.seq for f in self.publishing],
            "rate": self.rate,
            "streams": self.streams,
            "peak_streams": self.peak_streams,
            "accepted_streams": self.accepted_streams,
            "per_key": {
                "keys_open": sum(1 for f in keyed if f.streams),
                "keys_accepted": sum(1 for f in keyed if f.accepted),
                # A key whose stream was opened more than once: a reconnect, or
                # two subscriptions over the session.
                "keys_accepted_more_than_once": sum(1 for f in keyed if f.accepted > 1),
                "max_streams": max((f.streams for f in keyed), default=0),
                "max_peak_streams": max((f.peak for f in keyed), default=0),
                "publishing_keys": len(self.publishing) if keyed else 0,
                "publishing_keys_without_stream": sum(
                    1 for f in self.publishing if f.key and not f.streams
                ),
            },
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
        feed: Feed | None = None
        if parts.path == "/events":
            feed = self.feeds[""]
        elif parts.path.startswith(KEY_PREFIX) and parts.path.endswith(KEY_SUFFIX):
            key = unquote(parts.path[len(KEY_PREFIX) : -len(KEY_SUFFIX)])
            if key and "/" not in key:
                feed = self.feed(key)
        if feed is not None:
            last = ""
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "last-event-id":
                    last = value.strip()
            await self._stream(reader, writer, feed, int(last) if last.isdigit() else None)
            return
        if parts.path == "/control":
            query = parse_qs(parts.query)
            if "rate" in query:
                keys = int(query["keys"][0]) if "keys" in query else None
                self.set_rate(float(query["rate"][0]), keys)
        body = json.dumps(self.stats()).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%b" % (len(body), body)
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        feed: Feed,
        last_id: int | None,
    ) -> None:
        cursor = last_id + 1 if last_id is not None else feed.seq + 1
        # A key may be quiet (no events) when the server closes its
        # subscription (linger after the key's last client): only a read sees
        # that close, and the per-key counts must. The static feed publishes
        # throughout every scenario and keeps its one coroutine per stream.
        watch = (
            asyncio.get_running_loop().create_task(_watch_close(reader, asyncio.current_task()))
            if feed.key
            else None
        )
        self.streams += 1
        self.accepted_streams += 1
        self.peak_streams = max(self.peak_streams, self.streams)
        feed.streams += 1
        feed.accepted += 1
        feed.peak = max(feed.peak, feed.streams)
        self.writers.add(writer)
        writer.write(STREAM_HEAD)
        events = feed.events
        try:
            while True:
                if writer.is_closing():
                    break
                if cursor > feed.seq:
                    await feed.wait_next()
                    continue
                cursor = max(cursor, feed.seq - feed.history + 1)
                # Per-connection formatting: the naive app's cost per client.
                out = []
                while cursor <= feed.seq:
                    out.append(f"id: {cursor}\ndata: {events[cursor]}\n\n".encode())
                    cursor += 1
                writer.write(b"".join(out))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if watch is not None:
                watch.cancel()
            self.streams -= 1
            feed.streams -= 1
            self.writers.discard(writer)
            writer.close()


async def _watch_close(reader: asyncio.StreamReader, stream: asyncio.Task[object] | None) -> None:
    """Cancel `stream` once the peer has closed (EOF or error); the server sends
    nothing after its request, so anything read is just skipped."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(4096):
            pass
    if stream is not None:
        stream.cancel()


async def _main(args: argparse.Namespace) -> None:
    publisher = NchanPublisher(args.publish_to) if args.publish_to else None
    upstream = SyntheticUpstream(size=args.size, history=args.history, publisher=publisher)
    if publisher is not None:
        await publisher.connect()
    port = await upstream.start(args.port)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(upstream.ticker()), loop.create_task(upstream.heartbeat())]
    print(f"upstream listening on {port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for task in tasks:
        task.cancel()


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
