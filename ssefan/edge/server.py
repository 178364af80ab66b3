"""The client-facing HTTP/1.1 server: an asyncio.Protocol over h11.

h11 parses requests and frames ordinary responses (keep-alive included). For a
stream, h11 writes the response head and then steps aside: the body is written
straight to the transport by the channel, so the per-client cost of an event
is one `transport.write` of bytes framed once for everybody.

Every request is checked first (request_checks.py: version, target form,
Host), and what that check read is what routing goes by and what the
pass-through forwards. A path that is no route but a variant of a protected
one (paths.variant_path) is 404, never passed through.

Two things need to await before they can answer: a pass-through exchange with
the app, and forward-auth before a stream opens. For those the connection is
handed off to a task: bytes the client sends go to a bounded inbox the task
pulls from (reading pauses when it is full), and the task waits on
`pause_writing` through a write gate (flow.py). When the task ends, the
connection goes back to keep-alive, becomes a stream, or closes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import h11

from ssefan.config import Config
from ssefan.core.paths import routing_path, variant_path
from ssefan.core.refusal import OPENING_COMMENT, RefusalReason, refusal_body
from ssefan.core.sse import encode_retry
from ssefan.edge import cors
from ssefan.edge.auth import UNAVAILABLE, AuthDecision, Credential, ForwardAuth
from ssefan.http.flow import Inbox, WriteGate
from ssefan.http.forwarding import describe_h11_error
from ssefan.http.request_checks import BadRequest, CheckedRequest, TargetForm, check_request
from ssefan.http.responses import raw_response, response_head
from ssefan.stream.channel import Channel, DisconnectReason, Subscriber

__all__ = ["HTTPConnection", "Server"]

log = logging.getLogger("ssefan.server")

# RFC 9112 §9.6: after answering a request whose body was not read (413, a
# failed upload), close the write side and read (and drop) for this long
# before closing, or the unread bytes make the kernel send a reset that can
# destroy the answer before the client reads it. 2 s covers a loopback or LAN
# client's in-flight data; a client still sending after that is cut.
LINGER_SECONDS = 2.0
# Query parameters that may carry the resume id on a first connect (EventSource
# can't set headers): ours, the camelCase spelling, and the EventSource polyfill's.
LAST_EVENT_ID_PARAMS = ("last_event_id", "lastEventId", "evs_last_event_id")

_BETWEEN_REQUESTS = frozenset({(h11.IDLE, h11.IDLE), (h11.DONE, h11.DONE)})

# Chromium fails a stream whose charset is anything but UTF-8 (or none).
STREAM_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
STREAM_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", STREAM_CONTENT_TYPE),
    # no-transform: stops proxies/CDNs from compressing or rewriting the stream.
    (b"cache-control", b"no-cache, no-store, no-transform"),
    # nginx (and proxies that copy it) would otherwise buffer the whole stream.
    (b"x-accel-buffering", b"no"),
]


@dataclass
class Server:
    """State shared by every connection of one listener."""

    config: Config
    channels: dict[str, Channel]
    connections: set[HTTPConnection] = field(default_factory=set)
    # Counters for refusals, by status code.
    refused: dict[int, int] = field(default_factory=dict)
    # Called for requests to paths that are not stream routes; True if it answered
    # (the demo serves its page this way).
    fallback: Callable[[HTTPConnection, h11.Request], bool] | None = None
    # Then the pass-through to the app (proxy.Proxy.forward), if `app` is set:
    # the connection is handed off to it until the exchange ends. It forwards
    # the target and host as check_request read them, which is what routing
    # went by: the app never reads a request other than ssefan did.
    pass_through: (
        Callable[[HTTPConnection, h11.Request, CheckedRequest], Coroutine[Any, Any, None]] | None
    ) = None
    # Forward-auth by route path.
    auth: dict[str, ForwardAuth] = field(default_factory=dict)
    # Set by App.drain(): the process is shutting down and new streams are refused.
    draining: bool = False
    # Jitter for refusals' `retry:` values.
    rng: random.Random = field(default_factory=random.Random)

    # Route paths in routing form (see routing_path), the variant forms of the
    # routes with protect_variants (see variant_path), and which routes they
    # were computed from (the App changes `channels` in place on a reload, and
    # a kept route's channel gets a new RouteConfig).
    _routes_for: tuple[object, ...] = field(default=(), init=False, repr=False)
    _routes_by_form: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _variants: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    # Variant forms of the upstream paths of protected routes whose upstream is
    # on the `app` origin: the app's own stream endpoint, which pass-through
    # would otherwise serve past the fan-out and forward-auth.
    _upstream_paths: dict[str, str] = field(default_factory=dict, init=False, repr=False)

    def protocol_factory(self) -> HTTPConnection:
        return HTTPConnection(self)

    def route(self, path: str) -> Channel | None:
        """The stream route a request path means, if any (see routing_path)."""
        channel = self.channels.get(path)  # the common case: the path as configured
        if channel is not None:
            return channel
        self._refresh_forms()
        configured = self._routes_by_form.get(routing_path(path))
        return None if configured is None else self.channels.get(configured)

    def variant_of(self, path: str) -> str | None:
        """The protected route `path` is a variant of, for a path that is no route.

        A route with `protect_variants` (the default) owns every path with
        its variant form (case folded, invisible characters removed: see
        variant_path); such a path is answered 404, never passed through. One
        dict lookup, looked at only for paths that are no route.
        """
        self._refresh_forms()
        if not self._variants:
            return None
        return self._variants.get(variant_path(path))

    def upstream_path_of(self, path: str) -> str | None:
        """The protected route whose upstream, on the app's origin, is `path`.

        With `app: http://127.0.0.1:8000` and a route `/events` fed from
        `http://127.0.0.1:8000/internal/stream`, a client asking for
        `/internal/stream` would reach the app's stream directly: one app
        stream per client again, and no forward-auth. Such a path (and its
        variants) is answered 404 like a variant of the route itself.
        """
        self._refresh_forms()
        if not self._upstream_paths:
            return None
        return self._upstream_paths.get(variant_path(path))

    def _refresh_forms(self) -> None:
        # Compared item by item, a route object unchanged since the last look
        # is the same object: this costs one identity check per route.
        routes = (self.config.app, *(channel.route for channel in self.channels.values()))
        if routes == self._routes_for:
            return
        self._routes_for = routes
        self._routes_by_form = {routing_path(p): p for p in self.channels}
        protected = {p: c.route for p, c in self.channels.items() if c.route.protect_variants}
        self._variants = {variant_path(p): p for p in protected}
        app = _origin(self.config.app) if self.config.app is not None else None
        self._upstream_paths = {}
        for path, route in protected.items():
            upstream = urlsplit(route.upstream.url)
            if app is not None and _origin(route.upstream.url) == app:
                own = variant_path(upstream.path or "/")
                if own not in self._variants:  # a route of ours is served as one
                    self._upstream_paths[own] = path

    def count_refusal(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


def _origin(url: str) -> tuple[str, str, int | None]:
    """scheme, host and port of `url`, the port made explicit (RFC 6454 §4)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _as_read(request: h11.Request, checked: CheckedRequest) -> list[tuple[bytes, bytes]]:
    """The request's headers with the Host it is for (check_request's reading).

    With an absolute-form target the target's authority is the host, whatever
    the Host header says (RFC 9112 §3.2.2): forward-auth's X-Forwarded-Host
    must name the host the stream was asked of, as the pass-through's does.
    """
    headers = request.headers.raw_items()
    if checked.target.authority is None:
        return headers
    return [(b"host", checked.target.authority)] + [
        (name, value) for name, value in headers if name.lower() != b"host"
    ]


def _head_size(request: h11.Request) -> int:
    """Bytes of the request line and headers as sent, less optional whitespace."""
    size = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n\r\n")
    for name, value in request.headers.raw_items():
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


class HTTPConnection(asyncio.Protocol):
    """One client connection: ordinary requests, or one stream until it ends."""

    # Slots: an idle stream costs this object plus a transport, thousands of times.
    __slots__ = (
        "_closing",
        "_gate",
        "_head_only",
        "_inbox",
        "_lost",
        "_switched",
        "_task",
        "_timer",
        "_unwatch",
        "channel",
        "config",
        "conn",
        "peer",
        "peer_ip",
        "scheme",
        "server",
        "subscriber",
        "transport",
    )

    def __init__(self, server: Server) -> None:
        self.server = server
        self.config = server.config
        self.conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=server.config.max_header_bytes
        )
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.peer_ip = ""
        self.scheme = "http"
        self.subscriber: Subscriber | None = None
        self.channel: Channel | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._lost = False
        self._head_only = False  # the current request is HEAD: no body may follow
        # While a task (pass-through or forward-auth) owns the connection.
        self._task: asyncio.Task[None] | None = None
        self._inbox: Inbox | None = None
        self._gate = WriteGate()
        self._unwatch: Callable[[], None] | None = None  # stop forward-auth revalidation
        self._switched = False  # receive_raw took h11's leftover bytes after a 101

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peer = self.transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
            self.peer_ip = str(peer[0])
        if self.transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self.server.connections.add(self)
        self._arm_timer(self.config.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_timer()
        self.server.connections.discard(self)
        if self.subscriber is not None and self.channel is not None:
            self.channel.unsubscribe(self.subscriber)
        gone = ConnectionResetError("the client closed the connection")
        self._gate.fail(gone)
        if self._inbox is not None:
            self._inbox.fail(gone)
        if self._task is not None:
            self._task.cancel()  # nobody to answer: stop the exchange with the app

    def data_received(self, data: bytes) -> None:
        if self.subscriber is not None or self._closing:
            # A stream's client has nothing more to say; anything it pipelines
            # is dropped, never buffered.
            return
        if self._inbox is not None:
            self._inbox.put(data)  # a task owns the connection: it pulls
            return
        self.conn.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._inbox is not None and self.subscriber is None:
            self._inbox.put_eof()
            return True  # half-closed: the task may still answer
        if self.subscriber is None and not self._closing:
            self.conn.receive_data(b"")
            self._process()
        return False  # let asyncio close the transport

    def pause_writing(self) -> None:
        if self.subscriber is not None and self.channel is not None:
            self.channel.pause(self.subscriber)
        else:
            self._gate.pause()

    def resume_writing(self) -> None:
        if self.subscriber is not None and self.channel is not None:
            self.channel.resume(self.subscriber)
        else:
            self._gate.resume()

    # -- request handling ---------------------------------------------------------

    def _process(self) -> None:
        conn = self.conn
        while not self._closing and self.subscriber is None and self._task is None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._protocol_error(exc)
                return
            if event is h11.NEED_DATA:
                if conn.their_state is h11.SEND_BODY and conn.our_state in (
                    h11.DONE,
                    h11.MUST_CLOSE,
                ):
                    # Answered at the head (404, 405, 403, a preflight) while the
                    # body is still coming. Nothing would bound how slowly it
                    # comes: close, lingering so the answer isn't lost to a reset.
                    self._close_lingering()
                return
            if event is h11.PAUSED:
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                    self._arm_timer(self.config.keepalive_timeout)
                    continue
                return
            if isinstance(event, h11.Request):
                self._cancel_timer()
                self._on_request(event)
            elif isinstance(event, h11.ConnectionClosed):
                self._close()
                return
            # Data / EndOfMessage of a request body we already answered: dropped.
            if conn.our_state is h11.MUST_CLOSE:
                if conn.their_state is h11.SEND_BODY:
                    self._close_lingering()  # the unread body must not reset the answer
                else:
                    self._close()
                return

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        self.server.count_refusal(status)
        # h11 quotes the offending line, which may be a Cookie or Authorization
        # header: neither the log nor the answer repeats it.
        problem = describe_h11_error(exc)
        log.info("peer=%s bad request (%d): %s", self.peer, status, problem)
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            reason = "request head too large" if status == 431 else "malformed request"
            self._write(raw_response(status, f"{status} {reason}: {problem}\n"))
        self._close()

    def _on_request(self, request: h11.Request) -> None:
        self._head_only = request.method == b"HEAD"
        size = _head_size(request)
        if size > self.config.max_header_bytes:
            # h11 applies max_incomplete_event_size only to a head still incomplete
            # after a read; a larger head that arrives whole in one read gets here.
            self.server.count_refusal(431)
            log.info("peer=%s bad request (431): request head of %d bytes", self.peer, size)
            self.respond(431, "431 request head too large\n", close=True)
            return
        checked = check_request(
            request.method, request.target, request.http_version, request.headers.raw_items()
        )
        if isinstance(checked, BadRequest):
            self._bad_request(checked)
            return
        if _header(request, b"content-length") is not None and (
            _header(request, b"transfer-encoding") is not None
        ):
            # RFC 9112 §6.1: such a message "ought to be handled as an error";
            # the two framings are how requests are smuggled past a proxy that
            # reads one and an app that reads the other. h11 would go by
            # Transfer-Encoding and keep the connection: refuse, and close it.
            self._bad_request(
                BadRequest(
                    400,
                    "request has both Content-Length and Transfer-Encoding"
                    " (a request-smuggling pattern)",
                ),
                answer="400 request has both Content-Length and Transfer-Encoding\n",
            )
            return
        target = checked.target
        server = self.server
        # `*` is the server as a whole (RFC 9112 §3.2.4), never a route.
        channel = server.route(target.path) if target.form is not TargetForm.ASTERISK else None
        if channel is None:
            self._not_a_route(request, checked)
            return
        method = request.method
        if method == b"OPTIONS":
            self._preflight(channel, request)
        elif method in (b"GET", b"HEAD"):
            self._open_stream(channel, request, checked)
        else:
            server.count_refusal(405)
            self.respond(
                405,
                f"405 {method.decode('latin-1')} not allowed on {channel.route.path}: use GET\n",
                [(b"allow", cors.ALLOWED_METHODS)],
            )

    def _bad_request(self, bad: BadRequest, answer: str | None = None) -> None:
        """Refuse a request at the door, and close: a client that sends one such
        request may well send more, or a tunnel's (or HTTP/2's) bytes next."""
        self.server.count_refusal(bad.status)
        # The reason, never the target or a header: either may carry a token.
        log.info(
            "peer=%s bad request (%d): %s; closing the connection",
            self.peer,
            bad.status,
            bad.reason,
        )
        self.respond(bad.status, answer or f"{bad.status} {bad.reason}\n", close=True)

    def _not_a_route(self, request: h11.Request, checked: CheckedRequest) -> None:
        """A request for anything but a stream route: refused if it is a
        protected route's variant, else the fallback's or the app's."""
        server = self.server
        target = checked.target
        closing = server.draining  # no keep-alive into a process that is leaving
        if target.form is not TargetForm.ASTERISK:
            protected = server.variant_of(target.path)
            if protected is not None:
                # An app that routes case-insensitively, or cuts the path at a
                # NUL, would serve its own stream here: past the fan-out and
                # past forward-auth. See docs/request-checks.md.
                server.count_refusal(404)
                log.info(
                    "peer=%s refused (404): a variant of route %s (protect_variants)",
                    self.peer,
                    protected,
                )
                self.respond(
                    404,
                    "404 not found: this path differs from a stream route only in case or"
                    " in invisible characters\n",
                    close=closing,
                )
                return
            fed = server.upstream_path_of(target.path)
            if fed is not None:
                server.count_refusal(404)
                log.info(
                    "peer=%s refused (404): the app's upstream endpoint of route %s"
                    " (protect_variants)",
                    self.peer,
                    fed,
                )
                self.respond(
                    404,
                    f"404 not found: this is the app's stream endpoint; subscribe to {fed}\n",
                    close=closing,
                )
                return
        if server.fallback is not None and server.fallback(self, request):
            return
        if server.pass_through is not None:
            self._hand_off(server.pass_through(self, request, checked))
            return
        if target.form is TargetForm.ASTERISK:
            # OPTIONS * asks what the server as a whole allows (RFC 9110 §9.3.7).
            self.respond(204, "", [(b"allow", cors.ALLOWED_METHODS)], close=closing)
            return
        self.respond(404, f"404 no route for {target.path}\n", close=closing)

    def _preflight(self, channel: Channel, request: h11.Request) -> None:
        route_cors = channel.route.cors
        origin = _header(request, b"origin")
        if route_cors is None or origin is None:
            self.respond(204, "", [(b"allow", cors.ALLOWED_METHODS)])
            return
        headers = cors.preflight_headers(route_cors, origin)
        if headers is None:
            self.server.count_refusal(403)
            self.respond(403, "403 origin not allowed\n")
            return
        self.respond(204, "", headers)

    def _open_stream(self, channel: Channel, request: h11.Request, checked: CheckedRequest) -> None:
        route = channel.route
        query = checked.target.query
        cors_headers = cors.response_headers(route.cors, _header(request, b"origin"))
        if cors_headers is None:
            self.server.count_refusal(403)
            self.respond(403, f"403 origin not allowed on {route.path}\n")
            return
        auth = self.server.auth.get(route.path)
        if route.auth is not None and (auth is None or auth.config != route.auth):
            # A reload changed this route's auth and nothing applied it: fail
            # closed rather than stream to whoever asks.
            log.warning(
                "route=%s forward-auth settings not in force (the last reload did not apply"
                " them): streams are refused (auth_unavailable); reload again (SIGHUP) or restart"
                " ssefan, and if it persists check routes[path=%s].auth (url) in the config",
                route.path,
                route.path,
            )
            self._refuse(channel, RefusalReason.AUTH_UNAVAILABLE, cors_headers)
            return
        if auth is None:
            self._start_stream(channel, request, query, cors_headers)
            return
        if self._refused(channel, cors_headers):
            return  # no auth call for a stream that could not open anyway
        credential = auth.credential(
            _as_read(request, checked),
            route.path,
            query,
            peer_ip=self.peer_ip,
            scheme=self.scheme,
            volatile_params=LAST_EVENT_ID_PARAMS,
        )
        self._hand_off(self._authorize(auth, credential, channel, request, query, cors_headers))

    async def _authorize(
        self,
        auth: ForwardAuth,
        credential: Credential,
        channel: Channel,
        request: h11.Request,
        query: str,
        cors_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Ask forward-auth, then open the stream in one synchronous step."""
        path = channel.route.path
        decision: AuthDecision | None
        try:
            decision = await auth.decide(credential)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this exchange itself was cancelled: the client is gone
            decision = None  # the ask was cancelled under us: its ForwardAuth closed
        if self._lost:
            return
        server = self.server
        if server.channels.get(path) is not channel or server.auth.get(path) is not auth:
            # A reload removed or replaced the route, or its forward-auth, while
            # we waited: neither this decision nor this channel is in force any
            # more (a removed route's channel is closed). The retry meets the
            # new settings.
            log.info("peer=%s route=%s reconfigured during forward-auth", self.peer, path)
            self._refuse(channel, RefusalReason.RECONFIGURED, cors_headers)
            return
        if decision is None or decision.status == UNAVAILABLE.status:
            # Unavailable is temporary (timeout, failure, saturation): a retry
            # the browser follows. 401/403 are final and passed on as they came.
            self._refuse(channel, RefusalReason.AUTH_UNAVAILABLE, cors_headers)
            return
        if not decision.admitted:
            server.count_refusal(decision.status)
            self._answer(decision, cors_headers)
            return
        # No await from here on: the capacity re-check, the head and the
        # subscribe (replay + going live) happen in this one event-loop step.
        self._start_stream(channel, request, query, cors_headers)
        if self.subscriber is not None and auth.config.revalidate is not None:
            self._unwatch = auth.watch(credential, self._credential_revoked)

    def _answer(self, decision: AuthDecision, cors_headers: list[tuple[bytes, bytes]]) -> None:
        """Pass on forward-auth's refusal (or its unavailability) as the answer."""
        self.respond(
            decision.status,
            decision.body,
            [*decision.headers, *cors_headers],
            content_type=decision.content_type,
        )

    def _credential_revoked(self) -> None:
        """Forward-auth no longer admits this stream's credential: end it cleanly."""
        if self.subscriber is not None and self.channel is not None:
            self.channel.end_stream(self.subscriber, DisconnectReason.REVOKED)

    def _refused(self, channel: Channel, cors_headers: list[tuple[bytes, bytes]]) -> bool:
        """Answer (and return True) if the route can't take a stream now."""
        if channel.stopped_by_upstream:
            # The app said "stop" (204); pass it on so browsers stop reconnecting.
            self.respond(204, "", cors_headers)
            return True
        if self.server.draining:
            # Shutting down: a stream opened now would only be cut; send the
            # client to the next instance after a short pause instead.
            self._refuse(channel, RefusalReason.SHUTTING_DOWN, cors_headers)
            return True
        if not channel.admits():
            self._refuse(channel, RefusalReason.MAX_CLIENTS, cors_headers)
            return True
        return False

    def _refuse(
        self,
        channel: Channel,
        reason: RefusalReason,
        cors_headers: list[tuple[bytes, bytes]],
    ) -> None:
        """Refuse a stream for a temporary reason, so that the client retries.

        By default (`refuse: retry`) the answer is a short 200 event stream
        that EventSource reconnects after (refusal.py says why); `refuse:
        status` gives SDKs a plain 503 with Retry-After. During a drain the
        connection closes after it, so nothing reuses it into this process.
        """
        route = channel.route
        channel.refused(reason)
        closing = self.server.draining
        if route.refuse == "status":
            self.server.count_refusal(503)
            retry_after = str(reason.retry_after_seconds).encode("ascii")
            self.respond(
                503,
                f"503 {reason.value.replace('_', ' ')} on {route.path}, retry shortly\n",
                [(b"retry-after", retry_after), *cors_headers],
                close=closing,
            )
            return
        self.respond(
            200,
            refusal_body(reason, self.server.rng),
            STREAM_HEADERS[1:] + cors_headers,
            close=closing,
            content_type=STREAM_CONTENT_TYPE,
        )

    def _start_stream(
        self,
        channel: Channel,
        request: h11.Request,
        query: str,
        cors_headers: list[tuple[bytes, bytes]],
    ) -> None:
        if self._refused(channel, cors_headers):
            return
        route = channel.route
        headers = STREAM_HEADERS + cors_headers
        conn = self.conn
        if request.method == b"HEAD":
            self._write(conn.send(response_head(200, headers)))
            self._write(conn.send(h11.EndOfMessage()))
            return
        head = conn.send(response_head(200, headers))
        assert self.transport is not None
        chunked = conn.their_http_version == b"1.1"
        subscriber = Subscriber(self.transport, chunked=chunked, on_close=self._stream_closed)
        opening = OPENING_COMMENT
        if route.retry is not None:
            opening += encode_retry(route.retry)
        self._write(head)
        subscriber.send(opening)
        self.subscriber, self.channel = subscriber, channel
        # A stream never parses or frames through h11 again (every path that
        # would is behind `subscriber is None`); its parser state is ~2 KB that
        # an idle stream would otherwise carry. Deleting it, rather than
        # sharing a placeholder, makes any stray use fail loudly.
        del self.conn
        channel.subscribe(subscriber, self._last_event_id(request, query))

    @staticmethod
    def _last_event_id(request: h11.Request, query: str) -> str | None:
        header = _header(request, b"last-event-id")
        if header:  # the header wins over the query parameter
            return header.decode("utf-8", errors="replace")
        if query:
            params = parse_qs(query, keep_blank_values=False)
            for name in LAST_EVENT_ID_PARAMS:
                if name in params:
                    return params[name][0]
        return None

    def _stream_closed(self, reason: DisconnectReason) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None

    # -- hand-off: a task owns the connection until it is done ---------------------

    def _hand_off(self, work: Coroutine[Any, Any, None]) -> None:
        assert self.transport is not None
        self._inbox = Inbox(self.transport)
        self._task = asyncio.get_running_loop().create_task(work)
        self._task.add_done_callback(self._handed_back)

    def _handed_back(self, task: asyncio.Task[None]) -> None:
        self._task = None
        inbox, self._inbox = self._inbox, None
        assert inbox is not None
        pending, at_eof = inbox.take(), inbox.at_eof  # take() also resumes reading
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("peer=%s request failed unexpectedly", self.peer, exc_info=exc)
            self.abort()
            return
        if self._lost or self._closing:
            return
        if self.subscriber is not None:
            # A stream now: it drops whatever the client sends, and ends as any
            # stream does when the client has closed its side.
            if at_eof and self.transport is not None:
                self.transport.close()
            return
        conn = self.conn
        if conn.their_state is h11.SEND_BODY and conn.our_state in (h11.DONE, h11.MUST_CLOSE):
            self._close_lingering()  # answered without reading the whole body
            return
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            # An upgraded tunnel, an aborted answer: the connection can't carry
            # another request.
            self._close()
            return
        # Pipelined bytes that arrived meanwhile are the next request.
        if pending:
            conn.receive_data(pending)
        if at_eof:
            conn.receive_data(b"")
        self._process()

    # -- proxy.Downstream: the pass-through exchange's view of this connection --------

    @property
    def writing_paused(self) -> bool:
        return self._gate.paused

    @property
    def keep_alive(self) -> bool:
        """False during a drain: a pass-through response then closes the
        connection, so no browser reuses it into a process that is leaving."""
        return not self.server.draining

    async def receive(self) -> h11.Event:
        """The next event of the request body, reading from the client as needed."""
        assert self._inbox is not None
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return cast(h11.Event, event)
            conn.receive_data(await self._inbox.get())

    def write(
        self, event: h11.InformationalResponse | h11.Response | h11.Data | h11.EndOfMessage
    ) -> None:
        data = self.conn.send(event)
        if data:
            self.write_raw(data)

    async def drain(self) -> None:
        await self._gate.wait()

    async def receive_raw(self) -> bytes:
        """After a protocol switch: the client's next bytes (b"" at EOF)."""
        assert self._inbox is not None
        if not self._switched:
            # What followed the upgrade request in the same read, handed over once.
            self._switched = True
            pending, _ = self.conn.trailing_data
            if pending:
                return bytes(pending)
        return await self._inbox.get()

    def write_raw(self, data: bytes) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        self.transport.write(data)

    def close(self) -> None:
        self._close()

    def close_if_idle(self) -> bool:
        """Close a keep-alive connection that is between requests (a drain).

        A request that a browser sends on a reused connection that closes
        before any response byte is resent on a fresh one (Chromium and
        Firefox both; RFC 9110 §9.2.2 allows it for GET), so closing idle
        connections first means no EventSource of theirs meets this process
        again. Returns True if it closed.
        """
        if self.subscriber is not None or self._task is not None or self._closing:
            return False
        conn = self.conn
        # Between requests is IDLE/IDLE, or DONE/DONE before h11 starts the
        # next cycle (that happens on the next read).
        between = (conn.their_state, conn.our_state) in _BETWEEN_REQUESTS
        if not between or conn.trailing_data[0]:
            return False  # a request is arriving: it gets its (drain) answer
        self._close()
        return True

    def abort(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    # -- writing ------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: str | bytes,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """Send a complete, Content-Length-framed response (keep-alive aware)."""
        payload = body.encode("utf-8") if isinstance(body, str) else body
        all_headers = list(headers or [])
        if status != 204:
            all_headers += [
                (b"content-type", content_type),
                (b"content-length", b"%d" % len(payload)),
            ]
        if close:
            all_headers.append((b"connection", b"close"))
        conn = self.conn
        out = conn.send(response_head(status, all_headers))
        if payload and not self._head_only:
            out += conn.send(h11.Data(data=payload))
        out += conn.send(h11.EndOfMessage())
        self._write(out)

    def _write(self, data: bytes | None) -> None:
        if data and self.transport is not None:
            self.transport.write(data)

    def _close_lingering(self) -> None:
        """Half-close, drop what the client still sends, close after LINGER_SECONDS."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        self._closing = True  # data_received drops everything from now on
        self._cancel_timer()
        transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def _close(self) -> None:
        self._closing = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # -- timers -------------------------------------------------------------------

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        self._timer = asyncio.get_running_loop().call_later(delay, self._timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.subscriber is not None or self._closing:
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._close()  # idle keep-alive connection: nothing to say
            return
        self.server.count_refusal(408)
        self._write(raw_response(408, "408 request head not received in time\n"))
        self._close()
