"""Microbenchmarks for the hot path in memory: ring lookup by id, one publish to 10 000.

Run:

    .venv/bin/python -m pytest bench/test_micro_bench.py --benchmark-only -p no:cacheprovider

(``bench/`` is outside ``testpaths``, so name the file; ``--benchmark-only``
overrides the ``--benchmark-skip`` in pyproject's ``addopts``.) Each test puts
its throughput in ``extra_info`` (see ``--benchmark-json``) and prints it with
``-s``.

The publish benchmarks use fake transports -- a no-op ``write``, or
``list.append`` keeping a reference -- so they measure ssefan's own per-client
cost (the Python loop around ``transport.write``) without the kernel. The
loopback benchmark (``python -m bench run``) shows the other side: there,
almost all of the fan-out time is the ``write()`` system call itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest

from ssefan.config import RouteConfig, UpstreamConfig
from ssefan.core.ring import Ring
from ssefan.core.sse import Event, IdOnly, Overflow
from ssefan.stream.channel import Channel, Subscriber

SUBSCRIBERS = 10_000
PAYLOAD = "x" * 200


class NullTransport:
    """The least a transport can do: accept bytes and forget them."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


class RefTransport(NullTransport):
    """`write` is `list.append`: keeps a reference, as a real buffer would."""

    def __init__(self, sink: list[bytes]) -> None:
        # The channel keeps `transport.write` as each subscriber's writer, so
        # this makes every fan-out write one C-level list.append.
        self.write = sink.append  # type: ignore[method-assign,assignment]


def _report(benchmark: Any, items: int, unit: str) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info[f"{unit}/s"] = round(items / mean)
    benchmark.extra_info[f"ns/{unit}"] = round(mean / items * 1e9, 1)
    print(f"\n{benchmark.name}: {items / mean:,.0f} {unit}/s ({mean / items * 1e9:.1f} ns each)")


# --------------------------------------------------------------------------- ring


def _full_ring(size: int) -> tuple[Ring, list[str]]:
    ring = Ring(max_events=size, max_bytes=1 << 40, max_age=0)
    ids = [f"18c2f3a9b01-{n}" for n in range(size * 2)]
    for n, event_id in enumerate(ids):
        ring.append(event_id, b"id: %d\ndata: x\n\n" % n, 0.0)
    return ring, ids


@pytest.mark.parametrize("size", [1000, 100_000])
@pytest.mark.parametrize("outcome", ["hit", "evicted", "unknown"])
def test_ring_lookup_by_id(benchmark: Any, size: int, outcome: str) -> None:
    """What a reconnect costs to place: Ring.seq_of (+ was_evicted on a miss)."""
    ring, ids = _full_ring(size)
    rng = random.Random(1)
    if outcome == "hit":
        probes = rng.choices(ids[size:], k=1000)  # held
    elif outcome == "evicted":
        probes = rng.choices(ids[:size], k=1000)  # evicted, remembered as such
    else:
        probes = [f"nope-{n}" for n in range(1000)]

    def lookups() -> int:
        found = 0
        for event_id in probes:
            if ring.seq_of(event_id) is not None or ring.was_evicted(event_id):
                found += 1
        return found

    found = benchmark(lookups)
    assert found == (0 if outcome == "unknown" else len(probes))
    _report(benchmark, len(probes), "lookup")


# --------------------------------------------------------------------------- fan-out


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


def _channel(
    loop: asyncio.AbstractEventLoop,
    make_transport: Callable[[], NullTransport],
    *,
    chunked: bool,
    subscribers: int = SUBSCRIBERS,
) -> Channel:
    route = RouteConfig(
        path="/events",
        upstream=UpstreamConfig(url="http://127.0.0.1:9/events"),
        heartbeat=3600.0,
    )
    channel = Channel(route, loop=loop)
    for _ in range(subscribers):
        transport = cast("asyncio.WriteTransport", make_transport())
        channel.subscribe(Subscriber(transport, chunked=chunked), None)
    assert channel.client_count == subscribers
    return channel


class _Events:
    """Upstream-like events with increasing ids, `batch` per publish."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.n = 0

    def next(self) -> list[Event | IdOnly | Overflow]:
        out: list[Event | IdOnly | Overflow] = []
        for _ in range(self.batch):
            self.n += 1
            out.append(Event(PAYLOAD, id=str(self.n)))
        return out


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "raw"])
@pytest.mark.parametrize("batch", [1, 10])
def test_publish_to_10k_subscribers_noop_write(
    benchmark: Any, loop: asyncio.AbstractEventLoop, chunked: bool, batch: int
) -> None:
    """One upstream read (`batch` events) fanned out to 10 000 live subscribers."""
    channel = _channel(loop, NullTransport, chunked=chunked)
    source = _Events(batch)
    benchmark(lambda: channel.publish(source.next()))
    assert channel.stats.events_received == source.n
    _report(benchmark, SUBSCRIBERS, "subscriber write")
    benchmark.extra_info["events/s delivered"] = round(
        SUBSCRIBERS * batch / benchmark.stats.stats.mean
    )


def test_publish_to_10k_subscribers_keeping_references(
    benchmark: Any, loop: asyncio.AbstractEventLoop
) -> None:
    """Same, with each write keeping a reference to the shared bytes (list.append)."""
    sink: list[bytes] = []
    channel = _channel(loop, lambda: RefTransport(sink), chunked=True)
    source = _Events(1)
    benchmark.pedantic(
        lambda: channel.publish(source.next()), setup=sink.clear, rounds=300, iterations=1
    )
    # Every subscriber got the very same bytes object: encoded and framed once.
    assert len(sink) == SUBSCRIBERS
    assert len({id(data) for data in sink}) == 1
    _report(benchmark, SUBSCRIBERS, "subscriber write")
