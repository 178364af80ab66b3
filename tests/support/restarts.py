"""ssefan restarted under its clients, with `state_dir`: what the restart tests share.

* `state_config`, `stream_route`: a config on a fixed port (clients reconnect
  to the next process where the last one was) keeping its rings in a state
  directory, with a short drain.
* `Publisher`: the app publishing numbered events at a steady rate from a
  thread, with or without ids, all along the restarts.
* `Follower`: one asyncio client that, like an EventSource, reconnects each
  time its stream ends (or the port refuses) with the last id it saw, and
  keeps every event it got across all its connections, the `ssefan-gap`
  and `ssefan-retry` events apart.
* `restart`, `sigterm_and_wait`, `sigkill_and_wait`: a clean stop (and the
  next start), a crash.
* `restored`, `channel_files`, `journaled_ids`, `state_warnings`: the
  restore line a start logs, a channel's files in the state directory, what
  its journal holds on disk, and what the state files made ssefan warn of.
* `activated`: ssefan started the way systemd starts a socket-activated
  service (the socket the test holds at fd 3).
* `assert_exact`: a record is the published sequence, nothing lost or twice.
"""

from __future__ import annotations

import ast
import asyncio
import re
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sse_clients import AsyncSSEClient, ReceivedEvent
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, fast_upstream, signal_proc
from waits import DEFAULT_TIMEOUT

from ssefan.core.cursors import GAP_EVENT
from ssefan.core.persist import ChannelId, EventRecord, decode_journal
from ssefan.stream.state import file_stem

REFUSAL_EVENT = "ssefan-retry"
# A Follower's wait before it tries again after a refused or cut connection:
# its own reconnect delay (an EventSource has `retry:`), not a wait for
# anything. Short, so the next process is met soon after it listens.
RECONNECT_DELAY = 0.05
# The drain of a restart: short, yet long enough that events still flow to
# the streams not yet ended while others already reconnect and are refused.
DRAIN_WINDOW = "200ms"
SHUTDOWN_TIMEOUT = 5.0


def stream_route(
    upstream: FakeUpstream, path: str = "/events", **fields: object
) -> dict[str, object]:
    """A static route in front of `upstream` with quick upstream reconnects."""
    return {"path": path, "upstream": fast_upstream(upstream), "heartbeat": "15s", **fields}


def state_config(
    port: int, state_dir: Path, routes: Sequence[dict[str, object]], **top: object
) -> dict[str, object]:
    """ssefan on 127.0.0.1:`port` keeping its rings in `state_dir`; `top` overrides."""
    return {
        "listen": f"127.0.0.1:{port}",
        "state_dir": str(state_dir),
        "drain_window": DRAIN_WINDOW,
        "shutdown_timeout": f"{SHUTDOWN_TIMEOUT}s",
        **top,
        "routes": list(routes),
    }


# --------------------------------------------------------------------------- the app


class Publisher:
    """The app publishing events `1, 2, 3, ...` at `rate` a second from a thread.

    With `ids` (the default) each event's id is its number; without, the app
    sends no `id:` and ssefan assigns one. The data is always `event <n>`.
    `pause()` returns once no event is being published and none will be
    until `resume()` (for a test that needs the app quiet at one moment);
    `stop()` ends it.
    """

    def __init__(self, upstream: FakeUpstream, rate: float, *, ids: bool = True) -> None:
        self.upstream = upstream
        self.interval = 1 / rate
        self.with_ids = ids
        self.published: list[int] = []
        self._lock = threading.Lock()  # held while an event is published
        self._paused = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Publisher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def last(self) -> int:
        """The number of the last event published (0: none yet)."""
        return self.published[-1] if self.published else 0

    def data(self) -> list[str]:
        return [f"event {n}" for n in self.published]

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.interval):  # the app's pace, not a wait for anything
            with self._lock:
                if self._paused:
                    continue
                n += 1
                self.upstream.publish(f"event {n}", id=str(n) if self.with_ids else None)
                self.published.append(n)

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(DEFAULT_TIMEOUT)


# --------------------------------------------------------------------------- clients


class Follower:
    """A client that resumes with its last id whenever its stream ends, like an EventSource.

    It connects (with `Last-Event-ID` once it has an id), reads until the
    stream ends, and connects again, a refused or cut connection included,
    until it has seen `target`. `gate` cleared holds it off between two
    connections. `events` are the app's events over every connection, in
    order; gap and refusal events are counted apart.
    """

    def __init__(self, host: str, port: int, path: str = "/events") -> None:
        self.host = host
        self.port = port
        self.path = path
        self.events: list[ReceivedEvent] = []
        self.gaps: list[ReceivedEvent] = []
        self.refusals = 0  # `ssefan-retry` answers (a stream that came during a drain)
        self.streams = 0  # responses that opened a stream
        self.refused = 0  # connections the port refused
        self.cut = 0  # connections accepted and then closed before the response head
        self.resumed_from: list[str | None] = []  # the Last-Event-ID of each connection
        self.last_id: str | None = None
        self.target: str | None = None
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def done(self) -> bool:
        return self.target is not None and self.last_id == self.target

    @property
    def ids(self) -> list[str]:
        return [str(e.id) for e in self.events]

    async def run(self) -> None:
        while not self.done:
            await self.gate.wait()
            headers = {} if self.last_id is None else {"Last-Event-ID": self.last_id}
            try:
                client = await AsyncSSEClient.connect(
                    self.host, self.port, self.path, headers=headers
                )
            except ConnectionRefusedError:
                self.refused += 1
                await asyncio.sleep(RECONNECT_DELAY)  # the client's retry delay
                continue
            except (ConnectionError, asyncio.IncompleteReadError):
                self.cut += 1
                await asyncio.sleep(RECONNECT_DELAY)
                continue
            try:
                assert client.status == 200, (self.path, client.status, client.headers)
                self.streams += 1
                self.resumed_from.append(self.last_id)
                await self._read(client)
            finally:
                await client.close()

    async def _read(self, client: AsyncSSEClient) -> None:
        taken = 0
        while not client.decoder.ended and not self.done:
            try:
                data = await client.reader.read(65536)
            except ConnectionError:
                return
            if not data:
                return
            client.decoder.feed(data)
            for event in client.decoder.events[taken:]:
                if event.event == GAP_EVENT:
                    self.gaps.append(event)
                elif event.event == REFUSAL_EVENT:
                    self.refusals += 1
                else:
                    self.events.append(event)
                if event.id is not None:
                    self.last_id = event.id
            taken = len(client.decoder.events)


def past(followers: Sequence[Follower], n: int) -> Callable[[], bool]:
    """A condition: every follower has seen an event numbered above `n` (the app's ids)."""
    return lambda: all(int(f.last_id or 0) > n for f in followers)


async def wait_for(
    condition: Callable[[], bool],
    what: str,
    tasks: Sequence[asyncio.Task[None]] = (),
    within: float = DEFAULT_TIMEOUT,
) -> None:
    """Poll `condition` while the followers run; fail with `what` after
    `within` seconds, or with the error of a follower that failed."""
    try:
        async with asyncio.timeout(within):
            while not condition():
                for task in tasks:
                    if task.done():
                        task.result()  # its assertion, or a stream that ended for good
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


async def catch_up(
    publisher: Publisher, followers: Sequence[Follower], tasks: Sequence[asyncio.Task[None]]
) -> None:
    """Stop publishing, then wait until every follower has the last event."""
    publisher.stop()
    final = str(publisher.last)
    for follower in followers:
        follower.target = final
    await wait_for(lambda: all(f.done for f in followers), f"every client at {final}", tasks)


async def finish(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Stop the followers still running, and raise the first one's error, if any."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            raise result


# --------------------------------------------------------------------------- ssefan


def sigterm_and_wait(proc: SsefanProcess, within: float = SHUTDOWN_TIMEOUT + 5) -> int:
    """SIGTERM, then wait for the exit (its drain and final snapshots); the exit status."""
    assert proc.proc is not None
    signal_proc(proc, signal.SIGTERM)
    try:
        status = proc.proc.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"ssefan did not exit within {within}s of SIGTERM:\n{proc.log_text()}"
        ) from None
    proc.stop()  # reaps the log reader
    return status


def restart(procs: list[SsefanProcess], *, saved: int = 1, workers: int = 1) -> SsefanProcess:
    """Stop the last of `procs` with SIGTERM, check that it exited 0 having
    saved `saved` rings (in each of its `workers`), and start the next
    process on the same config (in `procs` before it starts, so the caller
    stops it whatever happens)."""
    old = procs[-1]
    status = sigterm_and_wait(old)
    assert status == 0, f"exit status {status}:\n{old.log_text()}"
    saves = old.log_text().count(f"state_dir: saved {saved} rings to")
    assert saves == workers, f"{saves} of {workers} saved {saved} rings:\n{old.log_text()}"
    new = SsefanProcess(old.config_path)
    procs.append(new)
    return new.start()


def sigkill_and_wait(proc: SsefanProcess) -> None:
    """kill -9: no drain, no final snapshot; what is on disk is what it wrote last."""
    assert proc.proc is not None
    signal_proc(proc, signal.SIGKILL)
    proc.proc.wait(DEFAULT_TIMEOUT)
    proc.stop()


# stream/persistence.py's line: "route=<label> restored N events (seq a..b,
# last upstream id '<id>') from <dir>"; a worker's line carries worker=<i>.
RESTORED = re.compile(
    r"route=(?P<label>.+?) restored (?P<count>\d+) events \(seq (?P<first>\d+)\.\.(?P<last>-?\d+),"
    r" last upstream id (?P<id>'[^']*')\) from (?P<dir>\S+?)\"?$"
)
WORKER = re.compile(r" worker=(\d+) ")


@dataclass(frozen=True)
class Restored:
    """One "restored" line of a start: a channel's ring as it came back."""

    label: str
    worker: int | None  # the worker's index (None: ssefan without workers)
    count: int
    first_seq: int
    last_seq: int
    last_upstream_id: str
    directory: str


def restored(proc: SsefanProcess) -> list[Restored]:
    """Every ring the process restored at start (or when a key's channel was made)."""
    out = []
    for line in proc.lines:
        match = RESTORED.search(line)
        if match:
            out.append(
                Restored(
                    label=match["label"],
                    worker=int(w[1]) if (w := WORKER.search(line)) else None,
                    count=int(match["count"]),
                    first_seq=int(match["first"]),
                    last_seq=int(match["last"]),
                    last_upstream_id=str(ast.literal_eval(match["id"])),
                    directory=match["dir"],
                )
            )
    return out


def channel_files(state_dir: Path, route: str, key: str = "", worker: int = 0) -> list[str]:
    """The names of a channel's files in `state_dir` (snapshot, journal, set aside)."""
    stem = file_stem(ChannelId(route, key, worker))
    return sorted(p.name for p in state_dir.glob(f"{stem}.*"))


def snapshot_path(state_dir: Path, route: str, key: str = "", worker: int = 0) -> Path:
    return state_dir / f"{file_stem(ChannelId(route, key, worker))}.snap"


# Bigger than any record the tests' small events make.
_MAX_RECORD = 1 << 20


def journaled_ids(state_dir: Path, route: str, key: str = "", worker: int = 0) -> list[str]:
    """The ids of the events a channel's journal on disk holds (written, not
    only buffered): what a SIGKILL now would keep. [] without a journal."""
    path = state_dir / f"{file_stem(ChannelId(route, key, worker))}.journal"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    read = decode_journal(
        data, expect_route=route, expect_key=key, expect_worker=worker, max_record_bytes=_MAX_RECORD
    )
    return [r.id for r in read.records if isinstance(r, EventRecord)]


def state_warnings(proc: SsefanProcess) -> list[str]:
    """Warnings and errors of the state files (a bad file, a failed write)."""
    return [
        line
        for line in proc.lines
        if "logger=ssefan.state" in line and ("level=warning" in line or "level=error" in line)
    ]


# --------------------------------------------------------------------------- checks


def assert_exact(ids: Sequence[str], published: Sequence[str], what: str) -> None:
    """`ids` is `published` from its first element on: nothing lost, nothing twice."""
    assert ids, f"{what}: no events"
    assert ids[0] in published, f"{what}: first id {ids[0]!r} was never published"
    start = list(published).index(ids[0])
    expected = list(published[start : start + len(ids)])
    if list(ids) != expected:
        seen, top = set(ids), _order(max(ids, key=_order))
        lost = [i for i in published[start:] if i not in seen and _order(i) <= top]
        twice = sorted({i for i in ids if ids.count(i) > 1}, key=_order)
        raise AssertionError(
            f"{what}: lost {lost[:10]} ({len(lost)}), twice {twice[:10]} ({len(twice)});"
            f" first difference at {_first_difference(ids, expected)}"
        )


def _order(value: str) -> tuple[int, str]:
    return (int(value), "") if value.isdigit() else (0, value)


def _first_difference(got: Sequence[str], expected: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return f"index {i}: got {a!r}, expected {b!r}"
    return f"length {len(got)} vs {len(expected)}"
