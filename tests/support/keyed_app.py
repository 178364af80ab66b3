"""The app behind a template route: one SSE stream per key, on loopback, observed by the test.

`KeyedApp` serves `GET /jobs/<key>/progress` for any key matching `KEY`
(ssefan's default key pattern), in its own thread and event loop on
127.0.0.1:0, like `FakeUpstream`. Per key it keeps:

* a history of events with integer ids 1, 2, 3, ... (`publish`), replayed
  after the request's Last-Event-ID as a good app does;
* every stream connection it accepted (`StreamConn`) with the times it saw
  it open and close, so a linger test waits on the app's own observation of
  the close (`wait_closed`), never on a sleep.

Every request is recorded as it arrived (`requests`: target and headers), so a
test can assert that no client credential and no target outside the template
(`outside_template`) ever reached the app. Keys in `unknown` are answered with
their status (404 or 410) instead of a stream. `GET /auth` is a forward-auth
endpoint deciding by (Cookie `session` name, X-Forwarded-Uri) in `auth_rules`
(403 for anything not listed). Any other target is answered 404.

`template_route` / `keyed_config` write the config of a template route in
front of it (`ssefan_process.write_config` takes the dict).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loopback_server import LoopbackServer
from waits import DEFAULT_TIMEOUT, wait_until

# The default key pattern of a template route (issue 12); the only stream
# targets an app behind ssefan should ever see are /jobs/<KEY>/progress.
KEY = "[A-Za-z0-9_-]{1,64}"
STREAM_TARGET = re.compile(f"/jobs/({KEY})/progress")
AUTH_PATH = "/auth"
ROUTE = "/jobs/{job}/progress"  # the template route the tests configure (and its metrics label)


def progress(key: str, prefix: str = "/jobs") -> str:
    """A client's path for `key` on the template route under `prefix`."""
    return f"{prefix}/{key}/progress"


def template_route(app: KeyedApp, path: str = ROUTE, **fields: object) -> dict[str, object]:
    """A template route in front of `app`; `fields` add to or override it."""
    return {"path": path, "upstream": app.upstream, "heartbeat": "15s", **fields}


def keyed_config(*routes: dict[str, object], **top: object) -> dict[str, object]:
    """A config on 127.0.0.1:0 with `routes` and top-level settings `top`."""
    return {"listen": "127.0.0.1:0", **top, "routes": list(routes)}


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in arrival order
    at: float  # time.monotonic() when the head had arrived

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None


@dataclass(slots=True)
class StreamConn:
    """One stream connection for a key, as the app saw it."""

    key: str
    last_event_id: str | None
    opened_at: float  # after the response head and any replay were written
    closed_at: float | None = None  # when the app read EOF (ssefan closed it)
    writer: asyncio.StreamWriter | None = field(default=None, repr=False)


class KeyedApp(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[SeenRequest] = []
        self.conns: list[StreamConn] = []  # every stream connection, in order of opening
        self.history: dict[str, list[tuple[int, bytes]]] = {}  # key -> (id, encoded block)
        self.unknown: dict[str, int] = {}  # key -> the status it is answered (404, 410)
        self.auth_rules: dict[tuple[str, str], int] = {}  # (session, X-Forwarded-Uri) -> status

    def _live_writers(self) -> list[asyncio.StreamWriter]:
        return [c.writer for c in self.conns if c.writer is not None and c.closed_at is None]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def upstream(self) -> str:
        """The template route's upstream URL for this app."""
        return f"{self.url}/jobs/{{job}}/progress"

    def _call(self, fn: Callable[[], None]) -> None:
        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(DEFAULT_TIMEOUT)

    # -- steering
    def publish(self, key: str, data: str, *, id: int | None = None, event: str = "") -> int:
        """Append one event to `key`'s history and write it to the key's open
        connections; `id` defaults to the key's next integer. Returns the id."""
        ids: list[int] = []

        def write() -> None:
            history = self.history.setdefault(key, [])
            event_id = id if id is not None else (history[-1][0] + 1 if history else 1)
            lines = [f"id: {event_id}", *([f"event: {event}"] if event else [])]
            lines += [f"data: {piece}" for piece in data.split("\n")]
            block = ("\n".join(lines) + "\n\n").encode()
            history.append((event_id, block))
            for conn in self.open_conns(key):
                assert conn.writer is not None
                conn.writer.write(block)
            ids.append(event_id)

        self._call(write)
        return ids[0]

    # -- observing (from the test's thread; lists are only appended to)
    def connections(self, key: str) -> list[StreamConn]:
        """Every stream connection the app accepted for `key`, open or closed."""
        return [c for c in list(self.conns) if c.key == key]

    def open_conns(self, key: str) -> list[StreamConn]:
        return [c for c in self.connections(key) if c.closed_at is None]

    def open_count(self, key: str) -> int:
        return len(self.open_conns(key))

    def open_keys(self) -> set[str]:
        return {c.key for c in list(self.conns) if c.closed_at is None}

    def requests_for(self, key: str) -> list[SeenRequest]:
        """Requests for `key`'s stream (answered or not: unknown keys too)."""
        return [r for r in self.stream_requests() if _key_of(r.target) == key]

    def stream_requests(self) -> list[SeenRequest]:
        """Every request but forward-auth's."""
        return [r for r in list(self.requests) if _path_of(r.target) != AUTH_PATH]

    def auth_requests(self) -> list[SeenRequest]:
        return [r for r in list(self.requests) if _path_of(r.target) == AUTH_PATH]

    def outside_template(self) -> list[str]:
        """Targets that are neither forward-auth nor exactly /jobs/<KEY>/progress
        (a query counts as outside: the template's upstream URL has none)."""
        return [r.target for r in self.stream_requests() if _key_of(r.target) is None]

    def wait_connections(
        self, key: str, n: int = 1, timeout: float = DEFAULT_TIMEOUT
    ) -> list[StreamConn]:
        """Wait until `key` has at least `n` open connections; return them."""
        wait_until(lambda: self.open_count(key) >= n, timeout, f"{n} open stream(s) for {key!r}")
        return self.open_conns(key)

    def wait_closed(self, key: str, n: int = 1, timeout: float = DEFAULT_TIMEOUT) -> StreamConn:
        """Wait until `n` of `key`'s connections have closed; return the n-th to close."""

        def closed() -> list[StreamConn]:
            return sorted(
                (c for c in self.connections(key) if c.closed_at is not None),
                key=lambda c: c.closed_at or 0.0,
            )

        wait_until(lambda: len(closed()) >= n, timeout, f"{n} closed stream(s) for {key!r}")
        return closed()[n - 1]

    def wait_requests(self, key: str, n: int = 1, timeout: float = DEFAULT_TIMEOUT) -> None:
        wait_until(lambda: len(self.requests_for(key)) >= n, timeout, f"{n} request(s) for {key}")

    # -- server side
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        request = _parse(head)
        self.requests.append(request)
        key = _key_of(request.target)
        if _path_of(request.target) == AUTH_PATH:
            await self._answer(writer, self._authorize(request), b"auth\n")
        elif key is None or request.method != "GET":
            await self._answer(writer, 404, b"no such stream\n")
        elif key in self.unknown:
            await self._answer(writer, self.unknown[key], b"no such job\n")
        else:
            await self._stream(key, request, reader, writer)

    def _authorize(self, request: SeenRequest) -> int:
        cookies = dict(
            part.strip().partition("=")[::2] for part in (request.header("cookie") or "").split(";")
        )
        uri = request.header("x-forwarded-uri") or ""
        return self.auth_rules.get((cookies.get("session", ""), uri), 403)

    async def _answer(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _stream(
        self,
        key: str,
        request: SeenRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"cache-control: no-cache\r\nconnection: close\r\n\r\n"
        )
        last = request.header("last-event-id")
        if last is not None and last.isdigit():
            for event_id, block in self.history.get(key, []):
                if event_id > int(last):
                    writer.write(block)
        conn = StreamConn(key, last, time.monotonic(), writer=writer)
        self.conns.append(conn)
        try:
            while await reader.read(1024):
                pass
        except ConnectionError:
            pass
        finally:
            conn.closed_at = time.monotonic()
            writer.close()


def _parse(head: bytes) -> SeenRequest:
    request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, _ = [*request_line.split(" ", 2), "", ""][:3]
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name.strip().lower(), value.strip()))
    return SeenRequest(method, target, tuple(headers), time.monotonic())


def _path_of(target: str) -> str:
    return target.partition("?")[0]


def _key_of(target: str) -> str | None:
    """The key of a target exactly of the template's form (no query), else None."""
    match = STREAM_TARGET.fullmatch(target)
    return match[1] if match else None
