"""Independent SSE client implementations read a stream through ssefan and resume.

* `httpx-sse` (Python): reads events, loses its connection (it closes it
  itself, or the connection is cut under it), reconnects with the
  `Last-Event-ID` of the last event it saw.
* The npm `eventsource` package (Node, WHATWG EventSource semantics): reads
  events, its connection is cut, and it reconnects *by itself*, sending
  `Last-Event-ID` as browsers do.

How the disconnect is forced: a small TCP proxy (faults.CutProxy) sits
between the client and ssefan and severs the connection mid-stream. To the
client this is exactly a network failure or a server restart; nothing in
ssefan is bent for the test, and EventSource's own reconnect logic (the thing
worth checking) does the resuming. The proxy also records each request head,
so the test checks the id the client resumed with.

Events keep being published the whole time, before, during and after the
disconnect; each client must see every id exactly once, in order.

Node and the package are installed by `.ci/run` (`npm ci --prefix
tests/support/interop`). Without them the Node test fails with the command to run,
unless SSEFAN_SKIP_NODE=1 says to skip it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from faults import CutProxy
from httpx_sse import ServerSentEvent, connect_sse
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, running
from waits import wait_until

INTEROP_DIR = Path(__file__).parents[1] / "support" / "interop"
NODE_SCRIPT = INTEROP_DIR / "eventsource_client.mjs"
# Events a client reads before the disconnect, and after reconnecting before
# the publisher stops.
BEFORE_CUT = 10
AFTER_RESUME = 10
PUBLISH_INTERVAL = 0.005
PUBLISH_LIMIT = 4000  # a runaway bound: ~20 s of publishing at the interval above


class Publisher:
    """Publishes events with ids "1", "2", ... to the upstream until stopped."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and self.count < PUBLISH_LIMIT:
            n = self.count + 1
            self.upstream.publish(f"event-{n}", id=str(n))
            self.count = n
            self._stop.wait(PUBLISH_INTERVAL)  # pacing, not waiting for a condition

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def stop(self) -> int:
        """Stop and return the id of the last event published."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10.0)
        return self.count


@pytest.fixture
def ssefan(upstream: FakeUpstream, tmp_path: Path) -> Iterator[SsefanProcess]:
    # retry: EventSource waits this long before reconnecting (its default is 3 s).
    with running(upstream, tmp_path, retry="100ms") as proc:
        upstream.wait_connected()
        yield proc


@pytest.fixture
def proxy(ssefan: SsefanProcess) -> Iterator[CutProxy]:
    cut_proxy = CutProxy(ssefan.host, ssefan.port).start()
    try:
        yield cut_proxy
    finally:
        cut_proxy.close()


@pytest.fixture
def publisher(upstream: FakeUpstream) -> Iterator[Publisher]:
    pub = Publisher(upstream)
    try:
        yield pub
    finally:
        pub.stop()


def assert_exactly_once_in_order(ids: list[str], last: int) -> None:
    numbers = [int(i) for i in ids]
    duplicates = sorted({n for n in numbers if numbers.count(n) > 1})
    missing = sorted(set(range(1, last + 1)) - set(numbers))
    assert not duplicates and not missing, f"duplicates {duplicates}, missing {missing}"
    assert numbers == list(range(1, last + 1)), "events out of order"


# --------------------------------------------------------------------------- httpx-sse


def dispatched(sse: ServerSentEvent, retries: list[int]) -> bool:
    """Whether an EventSource would dispatch this block as an event.

    httpx-sse also yields blocks without data (a lone `retry:` line, or a
    comment once an id was seen), which the WHATWG algorithm never dispatches;
    note the retry hints and leave those blocks out.
    """
    if sse.retry is not None:
        retries.append(sse.retry)
    return bool(sse.data)


@pytest.mark.parametrize("how", ["client-closes", "connection-cut"])
def test_httpx_sse_resumes_with_last_event_id(
    proxy: CutProxy, publisher: Publisher, how: str
) -> None:
    url = proxy.url("/events")
    received: list[ServerSentEvent] = []
    retries: list[int] = []
    with httpx.Client(timeout=httpx.Timeout(5.0)) as http:
        with connect_sse(http, "GET", url) as source:
            # The response head has arrived, so the client is subscribed: every
            # event from now on is one it must get.
            publisher.start()
            failed = False
            try:
                for sse in source.iter_sse():
                    if not dispatched(sse, retries):
                        continue
                    received.append(sse)
                    if len(received) == BEFORE_CUT:
                        if how == "client-closes":
                            break
                        assert proxy.cut() == 1
            except httpx.TransportError:
                failed = True
            assert failed == (how == "connection-cut")
        resume_from = received[-1].id
        assert resume_from == str(len(received))

        last: int | None = None
        with connect_sse(http, "GET", url, headers={"Last-Event-ID": resume_from}) as source:
            resumed_at = publisher.count
            for sse in source.iter_sse():
                if not dispatched(sse, retries):
                    continue
                received.append(sse)
                if last is None and int(sse.id) >= resumed_at + AFTER_RESUME:
                    last = publisher.stop()
                if last is not None and int(sse.id) >= last:
                    break
    assert last is not None
    assert_exactly_once_in_order([e.id for e in received], last)
    assert all(e.data == f"event-{e.id}" for e in received)
    assert [r.get("last-event-id") for r in proxy.requests] == [None, resume_from]
    assert retries == [100, 100], "each connection starts with the route's retry hint"


# --------------------------------------------------------------------------- npm eventsource


def node_or_fail() -> str:
    """The node executable, after checking the package is installed.

    Fails (never skips silently) when something is missing, unless
    SSEFAN_SKIP_NODE=1 asks to skip.
    """
    skip = os.environ.get("SSEFAN_SKIP_NODE") == "1"
    install = f"npm ci --prefix {os.path.relpath(INTEROP_DIR)}"

    def missing(what: str) -> str:
        if skip:
            pytest.skip(f"SSEFAN_SKIP_NODE=1: {what}")
        pytest.fail(f"{what} (or set SSEFAN_SKIP_NODE=1 to skip this test)", pytrace=False)

    node = shutil.which("node")
    if node is None:
        return missing("node is not installed: the interop test needs Node.js >= 20")
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < 20:
        return missing(f"node {version} is too old: the eventsource package needs Node.js >= 20")
    if not (INTEROP_DIR / "node_modules" / "eventsource" / "package.json").is_file():
        return missing(f"the npm eventsource package is not installed: run `{install}`")
    if skip:
        pytest.skip("SSEFAN_SKIP_NODE=1")
    return node


class NodeEventSource:
    """tests/support/interop/eventsource_client.mjs as a subprocess; its JSON lines, parsed."""

    def __init__(self, node: str, url: str) -> None:
        self.records: list[dict[str, object]] = []
        self.proc = subprocess.Popen(
            [node, str(NODE_SCRIPT), url],
            cwd=INTEROP_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(json.loads(line))

    def of_type(self, kind: str) -> list[dict[str, object]]:
        return [r for r in list(self.records) if r["type"] == kind]

    def ids(self) -> list[str]:
        return [str(r["id"]) for r in self.of_type("message")]

    def wait(self, condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        def done() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited ({self.proc.returncode}) waiting for {what}")
            return condition()

        try:
            wait_until(done, timeout, what)
        except AssertionError as err:
            raise AssertionError(f"{err}; node printed {self.records[-5:]}") from None

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the script's signal to exit
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)
        self._reader.join(10.0)
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()


def test_node_eventsource_reconnects_by_itself_and_resumes(
    proxy: CutProxy, publisher: Publisher
) -> None:
    node = node_or_fail()
    client = NodeEventSource(node, proxy.url("/events"))
    try:
        client.wait(lambda: len(client.of_type("open")) >= 1, "the first open")
        publisher.start()
        client.wait(lambda: len(client.ids()) >= BEFORE_CUT, f"{BEFORE_CUT} events")
        assert proxy.cut() == 1
        client.wait(
            lambda: bool(client.of_type("error")) and len(client.of_type("open")) >= 2,
            "EventSource to notice the cut and reconnect",
        )
        resumed_at = publisher.count
        client.wait(
            lambda: any(int(i) >= resumed_at + AFTER_RESUME for i in client.ids()),
            "events after the reconnect",
        )
        last = publisher.stop()
        client.wait(lambda: str(last) in client.ids(), f"the last event ({last})")
    finally:
        client.stop()
    assert client.proc.returncode == 0, client.stderr

    assert_exactly_once_in_order(client.ids(), last)
    messages = client.of_type("message")
    assert all(m["data"] == f"event-{m['id']}" for m in messages)
    # EventSource resumed from the last event it had seen before the error.
    first_error = client.records.index(client.of_type("error")[0])
    seen_before = [r["id"] for r in client.records[:first_error] if r["type"] == "message"]
    assert [r.get("last-event-id") for r in proxy.requests] == [None, seen_before[-1]]
