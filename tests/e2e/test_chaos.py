"""Chaos on loopback: clients that keep dropping their connections, and an app
that keeps restarting, while events flow. The one property under test is
ssefan's promise: a client that resumes with Last-Event-ID gets every event
after that id exactly once, 0 lost and 0 duplicated, however often it (or the
app behind ssefan) goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sse_clients import AsyncSSEClient, ReceivedEvent
from sse_upstream import FakeUpstream, FixedPortUpstream
from ssefan_process import SsefanProcess, fast_upstream, write_config
from waits import DEFAULT_TIMEOUT


@contextlib.contextmanager
def serving(upstream: FakeUpstream, tmp_path: Path) -> Iterator[SsefanProcess]:
    route = {"path": "/events", "upstream": fast_upstream(upstream)}
    config: dict[str, object] = {"listen": "127.0.0.1:0", "routes": [route]}
    proc = SsefanProcess(write_config(tmp_path / "ssefan.yaml", config)).start()
    try:
        upstream.wait_connected()
        yield proc
    finally:
        proc.stop()


def assert_exact(ids: list[str], published: list[str], what: str) -> None:
    """`ids` is `published` from its first element on: nothing lost, nothing twice."""
    assert ids, f"{what}: no events"
    start = published.index(ids[0])
    expected = published[start : start + len(ids)]
    if ids != expected:
        lost = sorted(set(expected) - set(ids), key=int)
        twice = sorted({i for i in ids if ids.count(i) > 1}, key=int)
        raise AssertionError(f"{what}: lost {lost[:10]} ({len(lost)}), twice {twice[:10]}")


def only_app_events(events: list[ReceivedEvent], what: str) -> list[str]:
    """The ids of `events`, after checking ssefan sent nothing else (no gap)."""
    extra = [e for e in events if e.event or e.id is None]
    assert not extra, f"{what}: events that are not the app's: {extra[:3]}"
    return [e.id for e in events if e.id is not None]


class Publisher:
    """The app publishing numbered events at `rate` a second from a thread."""

    def __init__(self, upstream: FakeUpstream, rate: float) -> None:
        self.upstream = upstream
        self.interval = 1 / rate
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):  # the app's pace, not a wait for anything
            n += 1
            self.upstream.publish(f"event {n}", id=str(n))
            self.ids.append(str(n))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEFAULT_TIMEOUT)


# --------------------------------------------------------------------------- client churn

WORKERS = 30
RECONNECTS_EACH = 10  # 300 forced reconnects while events flow, 30 more at the end


def test_client_churn_loses_and_repeats_nothing(upstream: FakeUpstream, tmp_path: Path) -> None:
    """30 clients each read a few events, drop the TCP connection (a reset,
    often in the middle of an event), stay away for a moment and reconnect
    with Last-Event-ID: 300 reconnects while the app publishes 200 events a
    second. Then the app stops and each client resumes once more, up to the
    last event. Each client's concatenated record is exactly the published
    sequence from its first event on."""
    rng = random.Random(1729)

    async def churn(proc: SsefanProcess, n: int) -> list[ReceivedEvent]:
        record: list[ReceivedEvent] = []
        headers: dict[str, str] = {}
        for cycle in range(RECONNECTS_EACH + 1):
            client = await AsyncSSEClient.connect(proc.host, proc.port, headers=headers)
            assert client.status == 200, (n, cycle, client.status)
            try:
                record += await client.read_events(rng.randint(1, 15), within=5)
            finally:
                client.writer.transport.abort()  # a reset, not a goodbye
            headers = {"Last-Event-ID": str(record[-1].id)}
            await asyncio.sleep(rng.uniform(0, 0.1))  # offline a moment: events pile up
        return record

    async def resume_to(proc: SsefanProcess, record: list[ReceivedEvent], last: str) -> None:
        client = await AsyncSSEClient.connect(
            proc.host, proc.port, headers={"Last-Event-ID": str(record[-1].id)}
        )
        try:
            if record[-1].id != last:
                await client.read_events(int(last) - int(str(record[-1].id)), within=5)
                record += client.events
        finally:
            await client.close()

    async def flowing(proc: SsefanProcess) -> list[list[ReceivedEvent]]:
        return list(await asyncio.gather(*(churn(proc, n) for n in range(WORKERS))))

    async def afterwards(proc: SsefanProcess, records: list[list[ReceivedEvent]]) -> None:
        await asyncio.gather(*(resume_to(proc, record, publisher.ids[-1]) for record in records))

    with serving(upstream, tmp_path) as proc:
        with Publisher(upstream, rate=200) as publisher:
            records = asyncio.run(flowing(proc))
        asyncio.run(afterwards(proc, records))

    published = publisher.ids
    assert len(published) > 100, "the churn should overlap a steady flow of events"
    for n, record in enumerate(records):
        ids = only_app_events(record, f"client {n}")
        assert_exact(ids, published, f"client {n}")
        assert ids[-1] == published[-1], f"client {n} stopped at {ids[-1]}"


# --------------------------------------------------------------------------- app restarts

RESTARTS = 30
CLIENTS = 20


def test_app_restarts_lose_and_repeat_nothing(upstream: FakeUpstream, tmp_path: Path) -> None:
    """The app behind ssefan restarts 30 times on its port while it publishes
    and 20 clients stay connected. Each time it goes away abruptly (what it
    wrote last may never reach ssefan), some events are published while
    ssefan is still reconnecting, and the new instance replays its history
    after ssefan's Last-Event-ID, sometimes with a few events ssefan already
    has. Every client gets every event exactly once."""
    rng = random.Random(4242)
    published: list[str] = []
    instances: list[FakeUpstream] = [upstream]
    replayed = 0  # restarts after which ssefan had to be sent events it had missed

    def publish(app: FakeUpstream, count: int) -> None:
        for _ in range(count):
            n = str(len(published) + 1)
            app.publish(f"event {n}", id=n)
            published.append(n)

    def restart() -> None:
        nonlocal replayed
        old = instances[-1]
        publish(old, rng.randint(3, 12))
        old.close()  # connections aborted: unsent bytes are dropped
        new = FixedPortUpstream(old.port)
        new.history = list(old.history)  # the app keeps its history across restarts
        new.replay_overlap = rng.randint(0, 3)
        instances.append(new)
        new.start()
        publish(new, rng.randint(0, 3))  # before ssefan is back: only in the history
        new.wait_requests(1)
        resumed_from = new.requests[0].headers.get("last-event-id")
        assert resumed_from in published, new.requests[0]
        replayed += resumed_from != new.history[-1][0]
        new.wait_connected()

    async def read_all(client: AsyncSSEClient) -> None:
        while True:
            data = await client.reader.read(65536)
            if not data:
                raise AssertionError(f"a client's stream ended after {len(client.events)}")
            client.decoder.feed(data)

    async def until(condition: Callable[[], bool], readers: Sequence[asyncio.Future[None]]) -> None:
        """Poll `condition` (the readers feed the clients) up to DEFAULT_TIMEOUT."""
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            while not condition():
                for reader in readers:
                    if reader.done():
                        reader.result()  # a stream that ended: its assertion
                await asyncio.sleep(0.01)

    with serving(upstream, tmp_path) as proc:

        async def scenario() -> list[AsyncSSEClient]:
            clients = list(
                await asyncio.gather(
                    *(AsyncSSEClient.connect(proc.host, proc.port) for _ in range(CLIENTS))
                )
            )
            assert all(c.status == 200 for c in clients)
            readers = [asyncio.ensure_future(read_all(c)) for c in clients]
            try:
                for _ in range(RESTARTS):
                    await asyncio.to_thread(restart)
                await asyncio.to_thread(publish, instances[-1], 5)
                await until(lambda: all(len(c.events) >= len(published) for c in clients), readers)
            finally:
                for reader in readers:
                    reader.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
                for client in clients:
                    await client.close()
            return clients

        try:
            clients = asyncio.run(scenario())
        finally:
            for app in instances[1:]:
                app.close()

    assert len(instances) == RESTARTS + 1
    assert replayed > RESTARTS // 3, f"only {replayed} restarts needed a replay"
    for n, client in enumerate(clients):
        ids = only_app_events(client.events, f"client {n}")
        assert_exact(ids, published, f"client {n}")
        assert ids == published, f"client {n} missed the start or the end"
