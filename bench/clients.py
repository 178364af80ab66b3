"""The load: SSE clients as raw asyncio protocols on uvloop, spread over processes.

Each worker process holds a share of the clients and obeys commands from the
orchestrator over a multiprocessing pipe (one JSON-able dict per command and
per answer). Parsing is the minimum needed for the checks:

* every client finds the sequence number at the start of each event's data
  with one C-level regex over each read and checks it against its
  expected-next number (lost / duplicated / out-of-order counts);
* sampled clients also read the publish time (CLOCK_MONOTONIC ns, shared by all
  processes) next to it and record publish -> receive latency;
* chunked framing and comments are skipped by the regex, never decoded;
* on a template route each client subscribes to one key, and a C-level count
  of its key's tag in each read tells an event of another key (``wrong_key``).

Reads are split on the last complete event (a blank line), so an event cut in
two by TCP is checked once, when whole.

A worker can also *churn* (``churn_start`` / ``churn_stop``): open a new key at
a steady rate, wait for the response head, stay a moment and leave -- the load
of the key-churn scenario, next to the measured streams of other workers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import multiprocessing
import multiprocessing.connection
import re
import resource
import socket
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import Histogram, key_name, raise_nofile

__all__ = ["ChurnSpec", "ClientPool", "WorkerSpec"]

SEQ_RE = re.compile(rb"\ndata: (\d+) ")
LAT_RE = re.compile(rb"\ndata: (\d+) (\d+) ")
# id (any server's own format), sequence number and publish time: storm mode.
FULL_RE = re.compile(rb"\nid: ?([^\r\n]*)\r?\ndata: (\d+) (\d+) ")
# A slow reader's receive buffer: small, so it pushes back on the server
# within seconds instead of after megabytes of kernel autotuned buffer.
SLOW_RCVBUF = 4096
CONNECT_CONCURRENCY = 256
CONNECT_ATTEMPTS = 5
# A churning client that has no response head this long after it began to
# connect gives up (and counts as an error): far above any healthy answer.
CHURN_HEAD_TIMEOUT = 5.0

Reply = dict[str, Any]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    host: str
    port: int
    path: str
    count: int
    # Client i is latency-sampled when i % sample_every == 0 (and it isn't slow).
    sample_every: int
    # Client i is a designated slow reader when slow_every and
    # i % slow_every == slow_every // 2.
    slow_every: int = 0
    # Storm mode: parse ids and publish times on every client.
    full_parse: bool = False
    # Remember the server's own ids (nchan's are not our sequence numbers).
    track_ids: bool = False
    id_memory: int = 0
    # SO_RCVLOWAT for clients that are neither sampled nor slow (0 = off): see
    # LOWAT_NOTE.
    lowat: int = 0
    # This worker's first client is client number `offset` of the session
    # (latency sampling and keys go by that number, so they spread evenly).
    offset: int = 0
    # Template routes: `path` has a "{key}"; client g subscribes to key
    # key_name(g // per_key), so the clients of a key are numbered together.
    keys: int = 0
    per_key: int = 1


@dataclass(frozen=True, slots=True)
class ChurnSpec:
    """The key-churn load: open a new key every 1/rate s, stay `dwell` s after the head."""

    rate: float
    dwell: float
    # Key names are prefix + a running number: never one a measured client uses.
    prefix: str


LOWAT_NOTE = (
    "clients that are not latency-sampled set SO_RCVLOWAT so the kernel wakes them"
    " once per few KiB instead of once per event: every event is still read and"
    " checked (the low-water mark drops to 1 byte before each drain), but the load"
    " CPU stays free and the server's CPU is not charged for a wake-up of a local"
    " reader per write -- which remote browsers would not cost it either"
)


class Client(asyncio.Protocol):
    __slots__ = (
        "closed",
        "dup",
        "error",
        "expected",
        "fd",
        "first_seq",
        "head_at",
        "head_done",
        "ids",
        "index",
        "key_index",
        "key_tag",
        "last_seq",
        "live_at",
        "lost",
        "missing",
        "ooo",
        "path",
        "received",
        "replayed_at",
        "resume_header",
        "sampled",
        "slow",
        "storm_target",
        "storming",
        "tail",
        "transport",
        "w",
        "wrong_key",
    )

    def __init__(
        self,
        worker: Worker,
        index: int,
        *,
        sampled: bool,
        slow: bool,
        path: str,
        key_index: int = 0,
        key: str = "",
    ) -> None:
        self.w = worker
        self.index = index
        self.sampled = sampled
        self.slow = slow
        self.path = path
        # The index of this client's key in the upstream's publishing keys (0
        # on a static route), and its key as it appears in each event's data.
        self.key_index = key_index
        self.key_tag = f" {key} x".encode() if key else b""
        self.wrong_key = 0
        self.transport: asyncio.Transport | None = None
        self.fd = -1
        self.tail = b""
        self.head_done = False
        self.head_at = 0
        self.expected = -1
        self.first_seq = -1
        self.last_seq = -1
        self.received = 0
        self.lost = 0
        self.dup = 0
        self.ooo = 0
        self.missing: set[int] | None = None
        self.closed = True
        self.error = ""
        self.ids: collections.deque[tuple[int, bytes]] | None = None
        self.storming = False
        self.storm_target = 0
        self.replayed_at = 0
        self.live_at = 0
        self.resume_header = b""

    # -- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.closed = False
        sock = transport.get_extra_info("socket")
        self.fd = sock.fileno() if sock is not None else -1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        self.w.on_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        self.w.bytes += len(data)
        if self.tail:
            data = self.tail + data
            self.tail = b""
        start = 0
        if not self.head_done:
            i = data.find(b"\r\n\r\n")
            if i < 0:
                self.tail = data
                return
            if not self._on_head(data[:i]):
                return
            self.w.bytes -= i + 4
            start = i + 2  # keep one CRLF: every line then follows a "\n"
        end = data.rfind(b"\n\n") + 2
        crlf_end = data.rfind(b"\n\r\n") + 3
        if crlf_end > end:
            end = crlf_end
        if end <= start + 2:  # no complete event yet
            self.tail = data[start:]
            return
        # Keep the terminator's last "\n": the next event's first line then
        # follows a "\n" too, which is what the patterns anchor on.
        self.tail = data[end - 1 :]
        if self.storming or self.w.spec.full_parse:
            self._full(data, start, end)
            return
        if self.sampled:
            pairs = LAT_RE.findall(data, start, end)
            if not pairs:
                return
            w = self.w
            if w.measuring:
                now = time.monotonic_ns()
                hist = w.hist
                for _, t in pairs:
                    hist.add((now - int(t)) // 1000)
            seqs = [p[0] for p in pairs]
        else:
            seqs = SEQ_RE.findall(data, start, end)
            if not seqs:
                return
        if self.key_tag:
            # Each of this key's events carries its tag once; fewer tags than
            # events means some event belongs to another key.
            mine = data.count(self.key_tag, start, end)
            if mine != len(seqs):
                self.wrong_key += len(seqs) - mine
        self._check(seqs)

    # -- checks ---------------------------------------------------------------

    def _on_head(self, head: bytes) -> bool:
        if not (head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))):
            self.error = head.split(b"\r\n", 1)[0].decode("latin-1")[:80]
            self.w.on_error(self)
            if self.transport is not None:
                self.transport.abort()
            return False
        self.head_done = True
        self.head_at = time.monotonic_ns()
        self.w.on_head(self)
        if self.w.lowat_on and self.batched:
            self.set_lowat(self.w.spec.lowat)
        return True

    @property
    def batched(self) -> bool:
        return not self.sampled and not self.slow and not self.storming

    def set_lowat(self, size: int) -> None:
        transport = self.transport
        if transport is None or not self.head_done:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Lowering it re-checks readiness and wakes a reader (tcp_set_rcvlowat).
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)

    def _check(self, seqs: list[bytes]) -> None:
        n = len(seqs)
        self.w.events += n
        self.received += n
        first = int(seqs[0])
        exp = self.expected
        if exp < 0:
            exp = self.first_seq = first
        if first == exp and (
            n == 1
            or (int(seqs[-1]) == exp + n - 1 and list(map(int, seqs)) == list(range(exp, exp + n)))
        ):
            self.expected = exp + n
            self.last_seq = exp + n - 1
            return
        self._check_each([int(s) for s in seqs], exp)

    def _check_each(self, seqs: list[int], exp: int) -> None:
        for s in seqs:
            if s == exp:
                exp += 1
            elif s > exp:
                self.lost += s - exp
                if self.missing is None:
                    self.missing = set()
                if len(self.missing) < 100_000:
                    self.missing.update(range(exp, s))
                exp = s + 1
            elif self.missing is not None and s in self.missing:
                self.missing.discard(s)
                self.lost -= 1
                self.ooo += 1
            else:
                self.dup += 1
        self.expected = exp
        self.last_seq = exp - 1

    def _full(self, data: bytes, start: int, end: int) -> None:
        triples = FULL_RE.findall(data, start, end)
        if not triples:
            return
        if self.key_tag:
            mine = data.count(self.key_tag, start, end)
            if mine != len(triples):
                self.wrong_key += len(triples) - mine
        if self.ids is not None:
            self.ids.extend((int(seq), ident) for ident, seq, _ in triples)
        if self.storming:
            now = time.monotonic_ns()
            w = self.w
            if not self.live_at:
                for _, _, t in triples:
                    if int(t) >= w.storm_t0:
                        self.live_at = now
                        break
            if not self.replayed_at and int(triples[-1][1]) >= self.storm_target:
                self.replayed_at = now
            if self.live_at and self.replayed_at:
                self.storming = False
        self._check([seq for _, seq, _ in triples])

    # -- storm ----------------------------------------------------------------

    def begin_storm(self, back: int) -> None:
        """Remember where to resume (`back` events behind) and drop the connection."""
        last = self.last_seq
        resume = max(last - back, 0)
        header = str(resume).encode()
        if self.ids is not None:
            known = [(seq, ident) for seq, ident in self.ids if seq <= resume]
            if known:
                resume, header = known[-1]
            elif self.ids:
                resume, header = self.ids[0]
        self.resume_header = b"Last-Event-ID: " + header + b"\r\n"

        self.storm_target = last
        self.expected = resume + 1
        self.storming = True
        self.replayed_at = self.live_at = 0
        if self.transport is not None:
            self.transport.abort()

    def reset_connection(self) -> None:
        self.tail = b""
        self.head_done = False


class Worker:
    """One process's share of the clients, driven by commands on a pipe."""

    def __init__(self, spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
        self.spec = spec
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.clients: list[Client] = []
        self.events = 0
        self.bytes = 0  # body bytes read (to turn unread bytes into events)
        self.hist = Histogram()
        self.measuring = False
        self.heads = 0
        self.errors: dict[str, int] = {}
        self.connect_failures = 0
        self.disconnects = 0
        self.storm_t0 = 0
        self.closing = False
        self.lowat_on = spec.lowat > 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._window_events = 0.0
        self._window_cpu = 0.0
        self.churn: Churn | None = None
        for i in range(spec.count):
            g = spec.offset + i
            slow = bool(spec.slow_every) and g % spec.slow_every == spec.slow_every // 2
            sampled = not slow and g % spec.sample_every == 0
            if spec.keys:
                key_index = min(g // spec.per_key, spec.keys - 1)
                key = key_name(key_index)
                client = Client(
                    self,
                    i,
                    sampled=sampled,
                    slow=slow,
                    path=spec.path.format(key=key),
                    key_index=key_index,
                    key=key,
                )
            else:
                client = Client(self, i, sampled=sampled, slow=slow, path=spec.path)
            if spec.track_ids:
                client.ids = collections.deque(maxlen=spec.id_memory)
            self.clients.append(client)

    # -- callbacks from clients -----------------------------------------------

    def on_head(self, client: Client) -> None:
        self.heads += 1

    def on_error(self, client: Client) -> None:
        self.errors[client.error] = self.errors.get(client.error, 0) + 1

    def on_lost(self, client: Client, exc: Exception | None) -> None:
        if client.head_done:
            self.heads -= 1
        client.reset_connection()
        if self.closing:
            return
        if client.storming:
            # asyncio keeps only weak references to tasks: hold them until done.
            task = self.loop.create_task(self._open(client, storm=True))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif not client.slow:
            self.disconnects += 1

    # -- connecting -----------------------------------------------------------

    def request(self, path: str) -> bytes:
        spec = self.spec
        return (
            f"GET {path} HTTP/1.1\r\nHost: {spec.host}:{spec.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
        ).encode()

    async def _open(self, client: Client, *, storm: bool = False) -> None:
        spec = self.spec
        request = self.request(client.path) + (client.resume_header if storm else b"") + b"\r\n"
        for attempt in range(CONNECT_ATTEMPTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            if client.slow:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SLOW_RCVBUF)
            try:
                async with asyncio.timeout(30):
                    await self.loop.sock_connect(sock, (spec.host, spec.port))
                    transport, _ = await self.loop.create_connection(lambda: client, sock=sock)
            except (OSError, TimeoutError) as exc:
                sock.close()
                if attempt == CONNECT_ATTEMPTS - 1:
                    self.connect_failures += 1
                    key = f"connect: {type(exc).__name__}: {exc}"[:80]
                    self.errors[key] = self.errors.get(key, 0) + 1
                    return
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            transport.write(request)
            return

    async def connect(self) -> Reply:
        started = time.monotonic()
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(client: Client) -> None:
            async with gate:
                await self._open(client)

        await asyncio.gather(*(one(c) for c in self.clients))
        await self._wait(
            lambda: self.heads + self.connect_failures + sum(self.errors.values()) >= len(self),
            60.0,
        )
        return {
            "connected": self.heads,
            "failed": len(self) - self.heads,
            "errors": self.errors,
            "seconds": time.monotonic() - started,
        }

    def __len__(self) -> int:
        return len(self.clients)

    async def _wait(self, condition: Callable[[], bool], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- measuring ------------------------------------------------------------

    def _cpu(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def _loss(self) -> Reply:
        keep = [c for c in self.clients if not c.slow]
        lossy = [c for c in keep if c.lost or c.dup or c.ooo or c.wrong_key][:3]
        return {
            "examples": [
                {
                    "client": c.index,
                    "path": c.path,
                    "lost": c.lost,
                    "dup": c.dup,
                    "ooo": c.ooo,
                    "wrong_key": c.wrong_key,
                    "first_seq": c.first_seq,
                    "last_seq": c.last_seq,
                    "first_missing": sorted(c.missing)[:5] if c.missing else [],
                    "resume_header": c.resume_header.decode("latin-1").strip(),
                }
                for c in lossy
            ],
            "lost": sum(c.lost for c in keep),
            "dup": sum(c.dup for c in keep),
            "ooo": sum(c.ooo for c in keep),
            "wrong_key": sum(c.wrong_key for c in keep),
            "disconnects": self.disconnects,
            "open": sum(1 for c in keep if not c.closed),
        }

    def _unread_events(self) -> float:
        """Events delivered into batched clients' kernel buffers but not read yet.

        With SO_RCVLOWAT a client reads only every few KiB, so read counts
        alone would miss what sits below the low-water mark at each end of a
        window. FIONREAD says how many bytes wait; the bytes per event seen so
        far turn them into events.
        """
        if not self.lowat_on or not self.events:
            return 0.0
        unread = 0
        probe = bytearray(4)
        for c in self.clients:
            if c.fd >= 0 and c.batched and not c.closed:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(c.fd, termios.FIONREAD, probe)
                    unread += int.from_bytes(probe, sys.byteorder)
        return unread * self.events / max(1, self.bytes)

    def window_start(self) -> Reply:
        self.hist = Histogram()
        self.measuring = True
        self._window_events = self.events + self._unread_events()
        self._window_cpu = self._cpu()
        return self._loss()

    def window_end(self) -> Reply:
        self.measuring = False
        return {
            "events": round(self.events + self._unread_events() - self._window_events),
            "cpu": self._cpu() - self._window_cpu,
            "hist": self.hist.to_json(),
            **self._loss(),
        }

    def set_lowat(self, on: bool) -> None:
        if not self.spec.lowat:
            return
        self.lowat_on = on
        size = self.spec.lowat if on else 1
        for c in self.clients:
            if c.batched:
                c.set_lowat(size)

    async def drain(self, targets: list[int], seconds: float) -> Reply:
        """Wait until every client has its key's last event (`targets` by key index)."""
        keep = [c for c in self.clients if not c.slow and c.head_done]
        self.set_lowat(False)
        await self._wait(lambda: all(c.last_seq >= targets[c.key_index] for c in keep), seconds)
        self.set_lowat(True)
        behind = [c for c in keep if c.last_seq < targets[c.key_index]]
        return {
            "behind": len(behind),
            "behind_events": sum(targets[c.key_index] - c.last_seq for c in behind),
            **self._loss(),
        }

    # -- key churn ------------------------------------------------------------

    def churn_start(self, spec: ChurnSpec) -> Reply:
        if self.churn is not None:
            return {"error": "already churning"}
        self.churn = Churn(self, spec)
        return {"started": True}

    async def churn_stop(self) -> Reply:
        if self.churn is None:
            return {"error": "not churning"}
        churn, self.churn = self.churn, None
        return await churn.stop()

    # -- slow readers ---------------------------------------------------------

    def stop_slow(self) -> Reply:
        n = 0
        for c in self.clients:
            if c.slow and c.transport is not None:
                c.transport.pause_reading()
                n += 1
        return {"stopped": n}

    async def resume_slow(self) -> Reply:
        slow = [c for c in self.clients if c.slow]
        open_before = sum(1 for c in slow if not c.closed)
        # Bytes waiting unread in the slow readers' receive buffers: proof they stalled.
        unread = 0
        probe = bytearray(4)
        for c in slow:
            if c.fd >= 0 and not c.closed:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(c.fd, termios.FIONREAD, probe)
                    unread += int.from_bytes(probe, sys.byteorder)
        for c in slow:
            if c.transport is not None:
                c.transport.resume_reading()
        await asyncio.sleep(1.0)
        return {
            "slow": len(slow),
            "open_before_resume": open_before,
            "unread_bytes": unread,
            "cut_off": sum(1 for c in slow if c.closed),
            "slow_lost": sum(c.lost for c in slow),
        }

    # -- reconnect storm ------------------------------------------------------

    async def storm(self, t0: int, back: int, seconds: float, head: int) -> Reply:
        await asyncio.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9))
        self.storm_t0 = time.monotonic_ns()
        targets = [c for c in self.clients if not c.slow and not c.closed]
        lag_before = [max(0, head - c.last_seq) for c in targets]
        for c in targets:
            c.begin_storm(back)
        await self._wait(lambda: not any(c.storming for c in targets), seconds)
        t0 = self.storm_t0

        def ms(values: list[int]) -> list[float]:
            return [(v - t0) / 1e6 for v in values if v]

        return {
            "clients": len(targets),
            "head_ms": ms([c.head_at for c in targets if c.head_done]),
            "replayed_ms": ms([c.replayed_at for c in targets]),
            "live_ms": ms([c.live_at for c in targets]),
            "not_done": sum(1 for c in targets if c.storming),
            "lag_before": lag_before,
            **self._loss(),
        }

    # -- command loop ---------------------------------------------------------

    async def serve(self) -> None:
        commands: asyncio.Queue[Reply] = asyncio.Queue()
        self.loop.add_reader(self.conn.fileno(), lambda: commands.put_nowait(self.conn.recv()))
        while True:
            cmd = await commands.get()
            name = cmd["cmd"]
            reply: Reply
            if name == "connect":
                reply = await self.connect()
            elif name == "window_start":
                reply = self.window_start()
            elif name == "window_end":
                reply = self.window_end()
            elif name == "drain":
                reply = await self.drain(cmd["targets"], cmd["timeout"])
            elif name == "churn_start":
                reply = self.churn_start(ChurnSpec(**cmd["spec"]))
            elif name == "churn_stop":
                reply = await self.churn_stop()
            elif name == "stop_slow":
                reply = self.stop_slow()
            elif name == "resume_slow":
                reply = await self.resume_slow()
            elif name == "storm":
                reply = await self.storm(cmd["t0"], cmd["back"], cmd["timeout"], cmd["head"])
            elif name == "close":
                self.closing = True
                for c in self.clients:
                    if c.transport is not None:
                        c.transport.abort()
                await asyncio.sleep(0.1)
                self.conn.send({"closed": True, **self._loss()})
                return
            else:
                reply = {"error": f"unknown command {name}"}
            self.conn.send(reply)


class ChurnClient(asyncio.Protocol):
    """One churning client: connects, waits for its response head, stays, leaves."""

    __slots__ = ("buf", "churn", "head_at", "opened_at", "timer", "transport")

    def __init__(self, churn: Churn) -> None:
        self.churn = churn
        self.opened_at = time.monotonic_ns()
        self.head_at = 0
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.head_at:
            return  # the stream's body (retry:, heartbeats): not what churn measures
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end >= 0:
            self.head_at = time.monotonic_ns()
            self.churn.on_head(self, self.buf[:end])
            self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.churn.on_lost(self)

    def leave(self) -> None:
        """Close like a browser tab: a FIN, not a reset."""
        if self.transport is not None:
            self.transport.close()


class Churn:
    """Opens key `prefix<n>` every 1/rate s until stopped; each client stays `dwell`.

    The schedule is absolute (client n at start + n/rate), so a late loop
    catches up rather than lowering the offered rate.
    """

    def __init__(self, worker: Worker, spec: ChurnSpec) -> None:
        self.w = worker
        self.spec = spec
        self.loop = worker.loop
        self.started = self.loop.time()
        self.opened = 0
        self.connected = 0
        self.heads = 0
        self.left = 0
        self.open = 0
        self.errors: dict[str, int] = {}
        self.head_ms = Histogram()
        self.max_late = 0.0
        self.stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._opener = self.loop.create_task(self._run())

    async def _run(self) -> None:
        n = 0
        while not self.stopping:
            due = self.started + n / self.spec.rate
            delay = due - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            self.max_late = max(self.max_late, -delay)
            task = self.loop.create_task(self._one(n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1

    def _error(self, what: str) -> None:
        self.errors[what[:80]] = self.errors.get(what[:80], 0) + 1

    async def _one(self, n: int) -> None:
        self.opened += 1
        client = ChurnClient(self)
        spec = self.w.spec
        try:
            async with asyncio.timeout(CHURN_HEAD_TIMEOUT):
                transport, _ = await self.loop.create_connection(
                    lambda: client, spec.host, spec.port
                )
        except (OSError, TimeoutError) as exc:
            self._error(f"connect: {type(exc).__name__}: {exc}")
            return
        self.connected += 1
        self.open += 1
        path = spec.path.format(key=f"{self.spec.prefix}{n}")
        transport.write(self.w.request(path) + b"\r\n")
        client.timer = self.loop.call_later(CHURN_HEAD_TIMEOUT, self._give_up, client)

    def _give_up(self, client: ChurnClient) -> None:
        if not client.head_at and client.transport is not None:
            self._error("no response head in time")
            client.transport.abort()

    def on_head(self, client: ChurnClient, head: bytes) -> None:
        if client.timer is not None:
            client.timer.cancel()
        if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
            self._error(head.split(b"\r\n", 1)[0].decode("latin-1"))
            client.leave()
            return
        self.heads += 1
        self.head_ms.add((client.head_at - client.opened_at) // 1000)
        self.loop.call_later(self.spec.dwell, client.leave)

    def on_lost(self, client: ChurnClient) -> None:
        self.open -= 1
        if client.timer is not None:
            client.timer.cancel()
        if client.head_at:
            self.left += 1
        elif not self.w.closing:
            self._error("closed before its response head")

    async def stop(self) -> Reply:
        """Stop opening; wait for the open clients to leave; the counts."""
        self.stopping = True
        elapsed = self.loop.time() - self.started
        await self._opener
        await self.w._wait(
            lambda: not self._tasks and self.open <= 0,
            self.spec.dwell + CHURN_HEAD_TIMEOUT + 2.0,
        )
        return {
            "seconds": elapsed,
            "opened": self.opened,
            "connected": self.connected,
            "heads": self.heads,
            "left": self.left,
            "still_open": self.open,
            "errors": self.errors,
            "max_late_ms": round(self.max_late * 1000, 1),
            "head_hist": self.head_ms.to_json(),
        }


def _worker_main(spec: WorkerSpec, conn: multiprocessing.connection.Connection) -> None:
    raise_nofile()
    import uvloop

    async def run() -> None:
        await Worker(spec, conn).serve()

    uvloop.run(run())


class ClientPool:
    """The orchestrator's handle on the client worker processes."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[multiprocessing.process.BaseProcess] = []
        for spec in specs:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(spec, child), daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def call(self, cmd: Reply, timeout: float = 120.0) -> list[Reply]:
        for conn in self.conns:
            conn.send(cmd)
        replies: list[Reply] = []
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"client worker did not answer {cmd['cmd']} in {timeout}s")
            replies.append(conn.recv())
        return replies

    def close(self) -> list[Reply]:
        replies: list[Reply] = []
        with contextlib.suppress(TimeoutError, OSError, EOFError):
            replies = self.call({"cmd": "close"}, timeout=30.0)
        for proc in self.procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5.0)
        return replies


def split_clients(total: int, workers: int) -> list[int]:
    base, extra = divmod(total, workers)
    return [base + (1 if i < extra else 0) for i in range(workers) if base or i < extra]


def merge_windows(replies: list[Reply]) -> Reply:
    hist = Histogram()
    for r in replies:
        hist.merge(Histogram.from_json(r["hist"]))
    return {
        "events": sum(r["events"] for r in replies),
        "cpu": sum(r["cpu"] for r in replies),
        "latency": hist,
        **sum_loss(replies),
    }


def sum_loss(replies: list[Reply]) -> Reply:
    keys = ("lost", "dup", "ooo", "wrong_key", "disconnects", "open")
    out: Reply = {k: sum(int(r.get(k, 0)) for r in replies) for k in keys}
    out["examples"] = [e for r in replies for e in r.get("examples", [])][:3]
    return out
