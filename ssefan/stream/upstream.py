"""The ONE subscription per route: an h11 client for the app's SSE endpoint.

Connect, stream, parse, hand batches to the sink; on EOF, error or a silent
stream (read-idle watchdog) reconnect with exponential backoff and full jitter,
resuming with Last-Event-ID. A 204 means "stop": the sink ends its streams and
the upstream is not retried until a reload or restart.

Why the last attempt ended is kept as one `LastFailure` record (its kind, a
sentence for people, how many attempts in a row failed, when the next one
is due): /readyz and the status page show it instead of a bare "backoff".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Protocol

import h11

from ssefan.config import UpstreamConfig
from ssefan.core.sse import Event, IdOnly, Overflow, Parser, resumable_id
from ssefan.http.flow import READ_WINDOW
from ssefan.http.forwarding import describe_exception
from ssefan.http.pool import split_url
from ssefan.http.redaction import redact
from ssefan.http.responses import MAX_RESPONSE_HEAD, is_event_stream

__all__ = ["FailureKind", "LastFailure", "Upstream", "UpstreamState"]

log = logging.getLogger("ssefan.upstream")

# One read from the upstream socket: asyncio's own read window, which holds
# hundreds of typical events, so a burst is parsed and fanned out as one batch.
READ_SIZE = READ_WINDOW
# An upstream `retry:` is honoured as the backoff base, within these bounds:
# a 0 ms retry must not turn a failing app into a busy loop.
MIN_RETRY_BASE = 0.1
USER_AGENT = "ssefan"


class UpstreamState(enum.Enum):
    IDLE = "idle"  # not started (lazy route without clients)
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    STOPPED = "stopped"  # the app answered 204, or stop() was called


class Sink(Protocol):
    """What the upstream feeds (a Channel)."""

    upstream_last_id: str

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None: ...

    def upstream_connected(self) -> None: ...

    def upstream_disconnected(self) -> None: ...

    def upstream_stopped(self) -> None: ...


class FailureKind(enum.Enum):
    """Why an upstream attempt ended: what an operator would check first."""

    STATUS = "status"  # the app answered, but not 200 (or 204)
    CONTENT_TYPE = "content_type"  # 200, but not text/event-stream
    REFUSED = "refused"  # nothing listens at host:port
    DNS = "dns"  # the host name does not resolve
    TLS = "tls"  # handshake or certificate verification failed
    TIMEOUT = "timeout"  # TCP + TLS took longer than connect_timeout
    IDLE_TIMEOUT = "idle_timeout"  # a stream with no byte for idle_timeout
    CLOSED = "closed"  # the connection ended or was reset (also a clean end of stream)
    PROTOCOL = "protocol"  # the app broke HTTP/1.1
    NETWORK = "network"  # another socket error: host or network unreachable...
    INTERNAL = "internal"  # a bug in ssefan (logged with its traceback)


@dataclasses.dataclass(frozen=True, slots=True)
class LastFailure:
    """How the upstream's most recent attempt ended. Kept after recovery
    (with `count` 0) so the status page can still say what happened last."""

    kind: FailureKind
    text: str  # one sentence: what was wrong, and what to check
    url: str  # the upstream URL, credentials redacted
    count: int  # attempts failed in a row; 0 once a later attempt streams
    at: float  # time.time() of the failure
    # When the next attempt is due, set on entering backoff: time.monotonic()
    # (for "in 0.4s") and time.time() (for a clock time people can compare).
    next_attempt: float | None = None
    next_attempt_wall: float | None = None

    def describe(self, state: UpstreamState, now: float | None = None) -> str:
        """`state` with this failure, in one line without ';' (/readyz joins
        reasons with it): kind, count, text, URL and the next attempt."""
        in_a_row = "1 failure" if self.count == 1 else f"{self.count} failures in a row"
        line = f"{state.value} ({self.kind.value}, {in_a_row}): {self.text}, url {self.url}"
        if state is UpstreamState.BACKOFF and self.next_attempt is not None:
            wait = max(0.0, self.next_attempt - (time.monotonic() if now is None else now))
            line += f", next attempt in {wait:.2f}s"
            if self.next_attempt_wall is not None:
                line += f" (at {_clock(self.next_attempt_wall)})"
        elif state is UpstreamState.CONNECTING:
            line += f", attempt {self.count + 1} under way"
        return line


def _clock(wall: float) -> str:
    stamp = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UpstreamFailure(Exception):
    """The app answered, but not with a usable event stream (remote side's fault)."""

    def __init__(self, kind: FailureKind, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Upstream:
    """Keeps one streaming subscription alive and feeds its events to a sink."""

    def __init__(
        self,
        config: UpstreamConfig,
        sink: Sink,
        *,
        route: str = "",
        on_state: Callable[[UpstreamState], None] | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.route = route
        self.origin, self.target = split_url(config.url)
        self.state = UpstreamState.IDLE
        self.on_state = on_state
        self.retry_hint: float | None = None  # seconds, from the upstream's `retry:`
        self.url = redact(config.url)  # what logs, /readyz and the status page show
        # Counters (rendered by metrics).
        self.connects = 0
        self.failures = 0
        self.last_failure: LastFailure | None = None
        self.streaming_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"upstream {self.route}"
            )

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.state is not UpstreamState.STOPPED:
            self._set_state(UpstreamState.IDLE)

    async def wait_stopped(self) -> None:
        task = self._task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def last_error(self) -> str:
        """The most recent failure's text ("" if there was none)."""
        return self.last_failure.text if self.last_failure is not None else ""

    def problem(self) -> str:
        """Why this upstream is not streaming, for /readyz: the state, and
        the last failure's kind, text, count and next attempt if any."""
        failure = self.last_failure
        if self.state is UpstreamState.STOPPED:
            return (
                "stopped: the app answered 204 No Content, so no reconnect until a reload"
                f" or restart, url {self.url}"
            )
        if failure is None or failure.count == 0 or self.state is UpstreamState.STREAMING:
            return f"{self.state.value}, url {self.url}"
        return failure.describe(self.state)

    def _set_state(self, state: UpstreamState, *, delay: float | None = None) -> None:
        """The one place states change. Entering STREAMING ends a run of
        failures; entering BACKOFF (after `delay` seconds) dates the next attempt."""
        failure = self.last_failure
        if failure is not None:
            if state is UpstreamState.STREAMING:
                failure = dataclasses.replace(
                    failure, count=0, next_attempt=None, next_attempt_wall=None
                )
            elif state is UpstreamState.BACKOFF and delay is not None:
                failure = dataclasses.replace(
                    failure,
                    next_attempt=time.monotonic() + delay,
                    next_attempt_wall=time.time() + delay,
                )
            self.last_failure = failure
        if state is self.state:
            return
        self.state = state
        if self.on_state is not None:
            self.on_state(state)

    def _failed(self, kind: FailureKind, text: str) -> LastFailure:
        before = self.last_failure
        count = before.count + 1 if before is not None else 1
        self.last_failure = LastFailure(kind, text, self.url, count, time.time())
        return self.last_failure

    # -- the reconnect loop -----------------------------------------------------

    def backoff_delay(self, attempt: int) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(cap, base*2^n)]."""
        # The floor guards against the app's `retry:` only; the operator's
        # configured base is taken as written (config requires it > 0).
        if self.retry_hint is not None:
            base = max(self.retry_hint, MIN_RETRY_BASE)
        else:
            base = self.config.backoff_base
        ceiling = min(self.config.backoff_max, base * (2**attempt))
        return self._rng.uniform(0, ceiling)

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._set_state(UpstreamState.CONNECTING)
            self.streaming_since = None
            try:
                stop = await self._stream_once()
                if not stop:
                    # WHATWG §9.2.3: a clean end of body means "reconnect". Not
                    # counted as a failure in the metrics, but /readyz says why
                    # the route is in backoff.
                    self._failed(FailureKind.CLOSED, "the app ended the stream")
            except (OSError, TimeoutError, h11.ProtocolError, UpstreamFailure) as exc:
                self.failures += 1
                failure = self._failed(*self._classify(exc))
                log.warning(
                    "route=%s upstream=%s failed: %s (kind=%s, attempt %d)",
                    self.route,
                    self.url,
                    failure.text,
                    failure.kind.value,
                    attempt + 1,
                )
                stop = False
            except Exception as exc:
                # A bug (ours, in parsing or fan-out), not the app's fault. The
                # route must not die silently while /readyz stays green: log it
                # loudly, count it, and carry on through the backoff like any
                # other failure.
                self.failures += 1
                self._failed(FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
                log.exception("route=%s upstream=%s internal error", self.route, self.url)
                stop = False
            # Whatever ended this attempt, the next response may open with a
            # replay of events the app already produced (the sink must not take
            # them for live ones).
            self.sink.upstream_disconnected()
            if stop:
                log.warning(
                    "route=%s upstream=%s answered 204: streams end, no reconnect "
                    "until reload or restart",
                    self.route,
                    self.url,
                )
                self._set_state(UpstreamState.STOPPED)
                self.sink.upstream_stopped()
                return
            if self._was_stable():
                attempt = 0
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._set_state(UpstreamState.BACKOFF, delay=delay)
            log.info("route=%s reconnecting to upstream in %.2fs", self.route, delay)
            await asyncio.sleep(delay)

    def _was_stable(self) -> bool:
        """Did the last connection stream long enough to reset the backoff?"""
        since = self.streaming_since
        return since is not None and time.monotonic() - since >= self.config.backoff_reset

    async def _stream_once(self) -> bool:
        """One connection: returns True if the app said stop (204)."""
        cfg, target = self.config, self.origin
        ssl_context = ssl.create_default_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    ssl=ssl_context,
                    server_hostname=target.host if ssl_context else None,
                    limit=READ_SIZE,
                )
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.TIMEOUT,
                f"no connection to {target.host}:{target.port} within"
                f" {cfg.connect_timeout:g}s (TCP + TLS): is the host up and reachable?"
                f" (routes[path={self.route}].upstream.connect_timeout)",
            ) from None
        try:
            return await self._converse(reader, writer)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _request_headers(self) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = [
            (b"Host", self.origin.host_header.encode("ascii")),
            (b"User-Agent", USER_AGENT.encode("ascii")),
            (b"Accept", b"text/event-stream"),
            (b"Cache-Control", b"no-cache"),
            # h11 does not decompress; a gzipped event stream would be unparseable.
            (b"Accept-Encoding", b"identity"),
        ]
        headers += [
            (name.encode("ascii"), value.encode("utf-8")) for name, value in self.config.headers
        ]
        last_id = self.sink.upstream_last_id
        if resumable_id(last_id):
            headers.append((b"Last-Event-ID", last_id.encode("utf-8")))
        return headers

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        request = h11.Request(method="GET", target=self.target, headers=self._request_headers())
        writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
        idle = self.config.idle_timeout
        parser: Parser | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    async with asyncio.timeout(idle):
                        data = await reader.read(READ_SIZE)
                except TimeoutError:
                    raise UpstreamFailure(FailureKind.IDLE_TIMEOUT, self._idle_text()) from None
                conn.receive_data(data)
                if parser is not None and not self._publish_ready(conn, parser):
                    return False
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                if event.status_code == 204:
                    return True
                self._check_response(event)
                parser = Parser(
                    max_line_bytes=self.config.max_line_bytes,
                    max_event_bytes=self.config.max_event_bytes,
                )
                self.connects += 1
                self.streaming_since = time.monotonic()
                self.sink.upstream_connected()
                self._set_state(UpstreamState.STREAMING)
                log.info("route=%s upstream=%s streaming", self.route, self.config.url)
                if not self._publish_ready(conn, parser):
                    return False
                continue
            if isinstance(event, h11.ConnectionClosed):
                raise UpstreamFailure(
                    FailureKind.CLOSED, "the app closed the connection before answering"
                )
            raise UpstreamFailure(
                FailureKind.PROTOCOL, f"unexpected {type(event).__name__} before the response"
            )

    def _idle_text(self) -> str:
        idle = self.config.idle_timeout
        return (
            f"no bytes for {idle:g}s (read-idle watchdog,"
            f" routes[path={self.route}].upstream.idle_timeout = {idle:g}s):"
            " raise upstream.idle_timeout or have the app send comments"
            f" (a ':' line) more often than every {idle:g}s."
            " A threaded app keeps a thread blocked in each abandoned stream"
            " until it next writes"
        )

    def _publish_ready(self, conn: h11.Connection, parser: Parser) -> bool:
        """Publish everything one read produced as one batch; False if the body ended."""
        items = self._drain_body(conn, parser)
        if items is None:
            return False
        if items:
            self.sink.publish(items)
        self._note_retry(parser)
        return True

    def _drain_body(
        self, conn: h11.Connection, parser: Parser
    ) -> list[Event | IdOnly | Overflow] | None:
        """Parse every body event h11 has ready. None means the body ended."""
        items: list[Event | IdOnly | Overflow] = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return items
            if isinstance(event, h11.Data):
                items += parser.feed(bytes(event.data))
                continue
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                # WHATWG §9.2.3: a clean end of body means "reconnect"; the
                # unfinished block is discarded (its id is not committed).
                items += [i for i in parser.close() if isinstance(i, Overflow)]
                if items:
                    self.sink.publish(items)
                log.info("route=%s upstream ended the stream", self.route)
                return None
            raise UpstreamFailure(
                FailureKind.PROTOCOL, f"unexpected {type(event).__name__} in the body"
            )

    def _check_response(self, response: h11.Response) -> None:
        status = response.status_code
        if status != 200:
            try:
                phrase = f" {HTTPStatus(status).phrase}"
            except ValueError:
                phrase = ""
            raise UpstreamFailure(
                FailureKind.STATUS,
                f"status {status}{phrase} (expected 200 with text/event-stream,"
                " or 204 to stop): check the URL and the app's log",
            )
        content_type = b""
        for name, value in response.headers:
            if name == b"content-type":
                content_type = value
        if not is_event_stream(content_type):
            shown = content_type.decode("latin-1") or "none"
            raise UpstreamFailure(
                FailureKind.CONTENT_TYPE,
                f"content type {shown!r} (expected text/event-stream):"
                " is the URL the app's SSE endpoint, not a page?",
            )

    def _note_retry(self, parser: Parser) -> None:
        if parser.retry is not None:
            self.retry_hint = parser.retry / 1000

    def _classify(self, exc: BaseException) -> tuple[FailureKind, str]:
        """The kind and a sentence for an exception that ended an attempt."""
        where = f"{self.origin.host}:{self.origin.port}"
        if isinstance(exc, UpstreamFailure):
            return exc.kind, str(exc)
        # Before OSError: ssl.SSLError and socket.gaierror are OSErrors too.
        if isinstance(exc, ssl.SSLCertVerificationError):
            # verify_message is set by OpenSSL's handshake, not by the constructor.
            why = getattr(exc, "verify_message", None) or exc
            return FailureKind.TLS, f"TLS certificate of {where} not accepted: {why}"
        if isinstance(exc, ssl.SSLError):
            return FailureKind.TLS, (
                f"TLS handshake with {where} failed ({getattr(exc, 'reason', None) or exc}):"
                " does it speak TLS on that port (https://)?"
            )
        if isinstance(exc, ConnectionRefusedError):
            return FailureKind.REFUSED, (
                f"connection refused by {where} ({type(exc).__name__}):"
                " is the app running and listening there?"
            )
        if isinstance(exc, socket.gaierror):
            return FailureKind.DNS, f"host {self.origin.host!r} does not resolve ({exc.strerror})"
        if isinstance(exc, ConnectionError):
            return FailureKind.CLOSED, f"connection to {where} lost ({describe_exception(exc)})"
        if isinstance(exc, TimeoutError):
            return FailureKind.TIMEOUT, f"timed out talking to {where} ({describe_exception(exc)})"
        if isinstance(exc, h11.ProtocolError):
            return FailureKind.PROTOCOL, f"the app's HTTP/1.1 response is malformed: {exc}"
        return FailureKind.NETWORK, f"network error with {where} ({describe_exception(exc)})"
