"""The ONE subscription per route to the app's SSE endpoint, over http.client.

Connect, stream, parse (each read as one batch), hand batches to the sink; on
EOF, error or a silent stream (read-idle watchdog) reconnect with exponential
backoff and full jitter, resuming with Last-Event-ID. A 204 means "stop": the
sink ends its streams and the upstream is not retried until a reload or restart.
A template route's key also stops on 404 and 410 (the app has no such key).

Why the last attempt ended is kept as one `LastFailure` record (its kind, a
sentence for people, how many attempts in a row failed, when the next one
is due): /readyz and the status page show it instead of a bare "backoff".
The record, the states and the classification of failures are status.py's.

Past 400 lines, knowingly: the reconnect loop and the conversation of one
connection share the upstream's state (the backoff attempt, the retry hint,
the state and last failure, the counters); the states and the classification
of failures are status.py's, the HTTP client http/client.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Protocol

import h11

from ssefan.config import UpstreamConfig
from ssefan.core.sse import Event, IdOnly, Overflow, Parser, resumable_id
from ssefan.http.client import OriginConnection, connect, split_url
from ssefan.http.flow import READ_WINDOW
from ssefan.http.redaction import redact
from ssefan.http.responses import is_event_stream

# What the upstream says about itself is status.py's; importable from here too.
from ssefan.stream.status import (
    ATTEMPT_FAILURES,
    FailureKind,
    LastFailure,
    UpstreamFailure,
    UpstreamState,
    classify,
)

__all__ = [
    "FailureKind",
    "LastFailure",
    "Upstream",
    "UpstreamCounts",
    "UpstreamFailure",
    "UpstreamState",
]

log = logging.getLogger("ssefan.upstream")

# One read from the upstream socket: asyncio's own read window, which holds
# hundreds of typical events, so a burst is parsed and fanned out as one batch.
# Bounded: the parser is fastest on chunks of this size (one socket read of
# uvloop's may bring 256 KiB).
READ_SIZE = READ_WINDOW
# An upstream `retry:` is honoured as the backoff base, within these bounds:
# a 0 ms retry must not turn a failing app into a busy loop.
MIN_RETRY_BASE = 0.1
USER_AGENT = "ssefan"
# One generator for every upstream's backoff jitter: a Random's state is
# 2.5 KiB, which ten thousand template keys would each carry.
_JITTER = random.Random()


class Sink(Protocol):
    """What the upstream feeds (a Channel)."""

    upstream_last_id: str

    def publish(self, items: Iterable[Event | IdOnly | Overflow]) -> None: ...

    def upstream_connected(self) -> None: ...

    def upstream_disconnected(self) -> None: ...

    def upstream_stopped(self, status: int) -> None: ...


class UpstreamCounts:
    """Counters rendered by metrics; the upstreams of a template's keys share
    one, so the route's totals are their sums and outlive a freed key."""

    __slots__ = ("connects", "failures")

    def __init__(self) -> None:
        self.connects = 0  # responses that began a stream
        self.failures = 0  # attempts that failed (then retried)


class Upstream:
    """Keeps one streaming subscription alive and feeds its events to a sink."""

    def __init__(
        self,
        config: UpstreamConfig,
        sink: Sink,
        *,
        route: str = "",
        on_state: Callable[[UpstreamState], None] | None = None,
        stop_statuses: frozenset[int] = frozenset({204}),
        counts: UpstreamCounts | None = None,
        quiet: bool = False,
    ) -> None:
        self.config = config
        self.sink = sink
        self.route = route
        self.origin, self.target = split_url(config.url)
        self.state = UpstreamState.IDLE
        self.on_state = on_state
        self.retry_hint: float | None = None  # seconds, from the upstream's `retry:`
        self.url = redact(config.url)  # what logs, /readyz and the status page show
        # Statuses that end the subscription rather than being retried.
        self.stop_statuses = stop_statuses
        self.stopped_with: int | None = None
        self.counts = counts if counts is not None else UpstreamCounts()
        # A template's keys come and go by the hundred: their routine
        # connects and ends are logged at debug, not info.
        self._routine = logging.DEBUG if quiet else logging.INFO
        self.last_failure: LastFailure | None = None
        self.streaming_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._rng = _JITTER

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
    def connects(self) -> int:
        return self.counts.connects

    @property
    def failures(self) -> int:
        return self.counts.failures

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
                f"stopped: the app answered {_status_text(self.stopped_with or 204)}, so no"
                f" reconnect until a reload or restart, url {self.url}"
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
        try:
            await self._reconnect_loop()
        except asyncio.CancelledError:
            # stop(): end quietly. A task that ends cancelled keeps its
            # CancelledError, whose traceback holds the frames that hold this
            # upstream and its channel: a reference cycle per stopped key.
            return

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while True:
            self._set_state(UpstreamState.CONNECTING)
            self.streaming_since = None
            try:
                stop = await self._stream_once()
                if stop is None:
                    # WHATWG §9.2.3: a clean end of body means "reconnect". Not
                    # counted as a failure in the metrics, but /readyz says why
                    # the route is in backoff.
                    self._failed(FailureKind.CLOSED, "the app ended the stream")
            except ATTEMPT_FAILURES as exc:
                self.counts.failures += 1
                failure = self._failed(*classify(exc, self.origin))
                log.warning(
                    "route=%s upstream=%s failed: %s (kind=%s, attempt %d)",
                    self.route,
                    self.url,
                    failure.text,
                    failure.kind.value,
                    attempt + 1,
                )
                stop = None
            except Exception as exc:
                # A bug (ours, in parsing or fan-out), not the app's fault. The
                # route must not die silently while /readyz stays green: log it
                # loudly, count it, and carry on through the backoff like any
                # other failure.
                self.counts.failures += 1
                self._failed(FailureKind.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
                log.exception("route=%s upstream=%s internal error", self.route, self.url)
                stop = None
            # Whatever ended this attempt, the next response may open with a
            # replay of events the app already produced (the sink must not take
            # them for live ones).
            self.sink.upstream_disconnected()
            if stop is not None:
                if stop == 204:
                    log.warning(
                        "route=%s upstream=%s answered 204: streams end, no reconnect "
                        "until reload or restart",
                        self.route,
                        self.url,
                    )
                self.stopped_with = stop
                self._set_state(UpstreamState.STOPPED)
                self.sink.upstream_stopped(stop)
                return
            if self._was_stable():
                attempt = 0
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._set_state(UpstreamState.BACKOFF, delay=delay)
            log.log(self._routine, "route=%s reconnecting to upstream in %.2fs", self.route, delay)
            await asyncio.sleep(delay)

    def _was_stable(self) -> bool:
        """Did the last connection stream long enough to reset the backoff?"""
        since = self.streaming_since
        return since is not None and time.monotonic() - since >= self.config.backoff_reset

    async def _stream_once(self) -> int | None:
        """One connection: returns the status if the app said stop (204, or
        one of stop_statuses), None if the stream ended for a reconnect."""
        cfg, target = self.config, self.origin
        try:
            connection = await connect(target, connect_timeout=cfg.connect_timeout)
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.TIMEOUT,
                f"no connection to {target.host}:{target.port} within"
                f" {cfg.connect_timeout:g}s (TCP + TLS): is the host up and reachable?"
                f" (routes[path={self.route}].upstream.connect_timeout)",
            ) from None
        try:
            return await self._converse(connection)
        finally:
            connection.close()
            with contextlib.suppress(Exception):
                await connection.wait_closed()

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

    async def _converse(self, connection: OriginConnection) -> int | None:
        """One request and its response, under the read-idle watchdog."""
        watchdog = _Watchdog(self.config.idle_timeout)
        try:
            return await self._exchange(connection, watchdog)
        except asyncio.CancelledError:
            if not watchdog.fired():
                raise
            raise UpstreamFailure(FailureKind.IDLE_TIMEOUT, self._idle_text()) from None
        finally:
            watchdog.stop()

    async def _exchange(self, connection: OriginConnection, watchdog: _Watchdog) -> int | None:
        request = h11.Request(method="GET", target=self.target, headers=self._request_headers())
        connection.write(request)
        connection.write(h11.EndOfMessage())
        parser: Parser | None = None
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                await connection.read(READ_SIZE)
                watchdog.fed()
                if parser is not None and not self._publish_ready(connection, parser):
                    return None
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                if event.status_code in self.stop_statuses:
                    return event.status_code
                self._check_response(event)
                parser = Parser(
                    max_line_bytes=self.config.max_line_bytes,
                    max_event_bytes=self.config.max_event_bytes,
                )
                self.counts.connects += 1
                self.streaming_since = time.monotonic()
                self.sink.upstream_connected()
                self._set_state(UpstreamState.STREAMING)
                log.log(self._routine, "route=%s upstream=%s streaming", self.route, self.url)
                if not self._publish_ready(connection, parser):
                    return None
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

    def _publish_ready(self, connection: OriginConnection, parser: Parser) -> bool:
        """Publish everything one read produced as one batch; False if the body ended."""
        items = self._drain_body(connection, parser)
        if items is None:
            return False
        if items:
            self.sink.publish(items)
        self._note_retry(parser)
        return True

    def _drain_body(
        self, connection: OriginConnection, parser: Parser
    ) -> list[Event | IdOnly | Overflow] | None:
        """Parse every body event h11 has ready. None means the body ended."""
        items: list[Event | IdOnly | Overflow] = []
        while True:
            event = connection.next_event()
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
                log.log(self._routine, "route=%s upstream ended the stream", self.route)
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


class _Watchdog:
    """The read-idle watchdog of one upstream connection.

    A read only notes the time (`fed`); one timer checks it and cancels the
    reading task after `idle` seconds without a byte. An `asyncio.timeout`
    around every read would make a timer and several pid checks per read, a
    cost per event that a template route with many quiet keys pays in full.
    """

    __slots__ = ("_fired", "_handle", "_idle", "_last", "_loop", "_task")

    def __init__(self, idle: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._idle = idle
        self._last = self._loop.time()
        self._fired = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(idle, self._check)

    def fed(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        silent = self._loop.time() - self._last
        if silent < self._idle:
            self._handle = self._loop.call_later(self._idle - silent, self._check)
            return
        self._handle = None
        self._fired = True
        if self._task is not None:
            self._task.cancel()

    def fired(self) -> bool:
        """Whether the watchdog cancelled the task (then undone: the caller
        raises the idle failure instead of being cancelled)."""
        task = self._task
        if not self._fired or task is None or task.cancelling() > 1:
            return False  # someone else cancelled it too (stop()): that one wins
        task.uncancel()
        return True

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)
