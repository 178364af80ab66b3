"""The drain: many streams ended spread out, so their reconnects don't come at once.

At shutdown every stream is ended in random order at an even rate over the
drain window (at least MIN_DRAIN_RATE a second), each told first, with a
jittered `retry:`, how long to wait before it reconnects. So the clients'
reconnects reach the next instance spread out rather than in one burst.
Upstreams keep feeding the streams not yet ended. Streams that still open
meanwhile are ended the same way rather than cut at stop. A reload that
changes a route's forward-auth ends that route's streams in the same way
(ops.app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence

from ssefan.core.cursors import DisconnectReason
from ssefan.core.refusal import RefusalReason
from ssefan.stream.channel import Channel
from ssefan.stream.subscriber import Subscriber

__all__ = [
    "DRAIN_RETRY_MS",
    "DRAIN_SHARE_OF_DEADLINE",
    "DRAIN_TICK",
    "MIN_DRAIN_RATE",
    "drain_streams",
    "end_spread",
]

log = logging.getLogger("ssefan")

# Drain: streams are ended in random order, spread evenly over drain_window,
# but at least this many per second. A few hundred reconnects a second are
# nothing for the next instance, and a handful of clients should not hold a
# restart for the whole window.
MIN_DRAIN_RATE = 200.0
# How often the drain ends its next batch: 50 batches a second look continuous
# to the instance receiving the reconnects.
DRAIN_TICK = 0.02
# The `retry:` (ms) each drained stream gets before it ends: a random wait in
# this range before the browser reconnects, so the closes' spread is not undone
# by everyone reconnecting at once. Up to 3 s, browsers' own default order, since
# EventSource keeps the value for later reconnects too.
DRAIN_RETRY_MS = RefusalReason.SHUTTING_DOWN.retry_range_ms
# Part of shutdown_timeout the drain may use; the rest is for stopping
# upstreams and flushing the last writes before the deadline.
DRAIN_SHARE_OF_DEADLINE = 0.8

Stream = tuple[Channel, Subscriber]


async def drain_streams(
    channels: Callable[[], Iterable[Channel]],
    window: float,
    rng: random.Random,
    hurry: asyncio.Event | None = None,
) -> int:
    """End every stream of the `channels()` (static routes' and template keys'),
    and those that open meanwhile, spread over `window` seconds (see
    end_spread). Returns the number ended."""

    def opened() -> int:
        # Streams ever opened: moves in the same event-loop step as the
        # subscribe. A template's keys share one ChannelStats: count it once.
        stats = {id(channel.stats): channel.stats for channel in channels()}
        return sum(each.connects for each in stats.values())

    seen = opened()

    def current() -> list[Stream]:
        return [(c, sub) for c in channels() for sub in c.subscribers()]

    def more() -> list[Stream] | None:
        # Everything is looked at again only when a stream opened since.
        nonlocal seen
        if opened() == seen:
            return None
        seen = opened()
        return current()

    streams = current()
    if streams:
        spread = min(window, len(streams) / MIN_DRAIN_RATE)
        log.info("draining %d streams over %.2fs", len(streams), spread)
    return await end_spread(streams, window, rng, hurry, more)


async def end_spread(
    streams: Sequence[Stream],
    window: float,
    rng: random.Random,
    hurry: asyncio.Event | None = None,
    more: Callable[[], list[Stream] | None] | None = None,
) -> int:
    """End `streams` in random order at an even rate over at most `window`
    seconds (at least MIN_DRAIN_RATE a second), each with a jittered
    `retry:`. `more()`, asked every tick, returns every stream again when
    new ones may have opened (None when not): what is left is spread over
    what is left of the window. `hurry` set ends the rest at once. Returns
    the number of streams ended."""
    loop = asyncio.get_running_loop()
    pending = list(streams)
    rng.shuffle(pending)
    start = last = loop.time()
    end_at = start + min(window, len(pending) / MIN_DRAIN_RATE)
    ended = 0
    while True:
        refreshed = more() if more is not None else None
        if refreshed is not None:
            pending = refreshed
            rng.shuffle(pending)
        if not pending:
            return ended
        now = loop.time()
        if (hurry is not None and hurry.is_set()) or now >= end_at:
            due = len(pending)
        else:
            due = math.ceil(len(pending) * (now - last) / (end_at - last))
        last = now
        cut = len(pending) - due
        batch, pending = pending[cut:], pending[:cut]
        for channel, sub in batch:
            if not sub.closed:  # the client may have left meanwhile
                channel.end_stream(sub, DisconnectReason.DRAIN, retry=rng.randint(*DRAIN_RETRY_MS))
                ended += 1
        if pending:
            await _sleep_or(DRAIN_TICK, hurry)


async def _sleep_or(delay: float, event: asyncio.Event | None) -> None:
    """Sleep `delay` seconds, or less if `event` is set meanwhile."""
    if event is None:
        await asyncio.sleep(delay)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(delay):
            await event.wait()
