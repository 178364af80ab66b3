"""What a checked request gets: a decision value, decided without I/O.

The protocol adapter (protocol.py: HTTP/1.1 over h11; an HTTP/2 adapter
later) reads a request, checks its framing and target (request_checks.py),
and asks `admit` what to do with it. The answer is one of:

- `Answer`: a complete response (a refusal, a preflight, a 404, a 405);
- `OpenStream`: subscribe the client to a channel now, in this event-loop step;
- `Authorize`: ask forward-auth first, then call `after_auth` with its decision;
- `NotARoute`: no stream route; the fallback or the pass-through may take it,
  else `NotARoute.answer` is the response.

Everything a stream's admission depends on lives here once: CORS, the
forward-auth settings actually in force, drain, capacity, the app's "stop"
(204), the temporary refusals a browser follows (refusal.py), and the
counters of what was refused. The adapter only frames what it is told.

A little past 400 lines: the answers are written out here (statuses, bodies,
log lines), so that the adapter holds none.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from ssefan.config import RouteConfig
from ssefan.core.refusal import RefusalReason, refusal_body
from ssefan.core.template import ChannelKey
from ssefan.edge import cors
from ssefan.edge.auth import UNAVAILABLE, AuthDecision, Credential, ForwardAuth
from ssefan.http.request_checks import CheckedRequest, TargetForm
from ssefan.stream.channel import Channel
from ssefan.stream.keyed import KeyedChannels

if TYPE_CHECKING:
    from ssefan.edge.server import Server

__all__ = [
    "LAST_EVENT_ID_PARAMS",
    "STREAM_CONTENT_TYPE",
    "STREAM_HEADERS",
    "Admission",
    "Answer",
    "Authorize",
    "Incoming",
    "NotARoute",
    "OpenStream",
    "admit",
    "after_auth",
]

log = logging.getLogger("ssefan.server")

Headers = list[tuple[bytes, bytes]]

TEXT_PLAIN = b"text/plain; charset=utf-8"
# Chromium fails a stream whose charset is anything but UTF-8 (or none).
STREAM_CONTENT_TYPE = b"text/event-stream; charset=utf-8"
STREAM_HEADERS: Headers = [
    (b"content-type", STREAM_CONTENT_TYPE),
    # no-transform: stops proxies/CDNs from compressing or rewriting the stream.
    (b"cache-control", b"no-cache, no-store, no-transform"),
    # nginx (and proxies that copy it) would otherwise buffer the whole stream.
    (b"x-accel-buffering", b"no"),
]
# Query parameters that may carry the resume id on a first connect (EventSource
# can't set headers): ours, the camelCase spelling, and the EventSource polyfill's.
LAST_EVENT_ID_PARAMS = ("last_event_id", "lastEventId", "evs_last_event_id")


@dataclass(frozen=True, slots=True)
class Incoming:
    """A request as admission reads it: whatever framing carried it."""

    method: bytes
    checked: CheckedRequest
    # As received (names in their case), with the Host it is for: see as_read.
    headers: Headers
    peer: str  # "ip:port", for logs
    peer_ip: str
    scheme: str  # "http" or "https", as the client reached ssefan

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower case), if present."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete response, framed with Content-Length (none for 204)."""

    status: int
    body: bytes = b""
    headers: Headers | None = None
    close: bool = False
    content_type: bytes = TEXT_PLAIN


@dataclass(frozen=True, slots=True)
class OpenStream:
    # None only for a HEAD on a template key without a live channel: a HEAD
    # gets the stream's head and no body, and makes no channel.
    channel: Channel | None
    cors_headers: Headers
    last_event_id: str | None


@dataclass(frozen=True, slots=True)
class KeyTarget:
    """A template route's key: its channel is made when its first stream opens."""

    family: KeyedChannels
    key: ChannelKey


# What a stream request is for: a static route's channel, or a template's key.
Target = Channel | KeyTarget


@dataclass(frozen=True, slots=True)
class Authorize:
    """Ask `auth` about `credential`; if it admits, a stream of `target` opens."""

    auth: ForwardAuth
    credential: Credential
    target: Target
    cors_headers: Headers
    last_event_id: str | None
    peer: str  # for logs
    head: bool  # a HEAD request: no body, and no channel is made for it


@dataclass(frozen=True, slots=True)
class NotARoute:
    """No stream route: for the fallback, the pass-through, or else `answer`."""

    answer: Answer


Admission = Answer | OpenStream | Authorize | NotARoute


def admit(server: Server, request: Incoming) -> Admission:
    """Decide what a checked request gets (see the module docstring)."""
    target = request.checked.target
    if target.form is TargetForm.ASTERISK:
        # `*` is the server as a whole (RFC 9112 §3.2.4), never a route.
        return _not_a_route(server, request)
    stream: Target | None = server.route(target.path)
    if stream is None:
        keyed = server.template(target.path, target.query)
        if keyed is None:
            return _not_a_route(server, request)
        stream = KeyTarget(*keyed)
    route = _route_of(stream)
    method = request.method
    if method == b"OPTIONS":
        return _preflight(server, route, request)
    if method in (b"GET", b"HEAD"):
        return _stream(server, stream, request)
    server.count_refusal(405)
    return Answer(
        405,
        f"405 {method.decode('latin-1')} not allowed on {route.path}: use GET\n".encode(),
        [(b"allow", cors.ALLOWED_METHODS)],
    )


def after_auth(
    server: Server, asked: Authorize, decision: AuthDecision | None
) -> Answer | OpenStream:
    """What a stream gets once forward-auth decided (None: the ask was cancelled).

    Called in the event-loop step that then opens the stream, so the capacity
    re-check and the subscribe see the same state.
    """
    target, cors_headers = asked.target, asked.cors_headers
    path = _route_of(target).path
    if not _in_force(server, target) or server.auth.get(path) is not asked.auth:
        # A reload removed or replaced the route, or its forward-auth, while
        # we waited: neither this decision nor this channel is in force any
        # more (a removed route's channel is closed). The retry meets the
        # new settings.
        log.info("peer=%s route=%s reconfigured during forward-auth", asked.peer, path)
        return _refusal(server, target, RefusalReason.RECONFIGURED, cors_headers)
    if decision is None or decision.status == UNAVAILABLE.status:
        # Unavailable is temporary (timeout, failure, saturation): a retry
        # the browser follows. 401/403 are final and passed on as they came.
        return _refusal(server, target, RefusalReason.AUTH_UNAVAILABLE, cors_headers)
    if not decision.admitted:
        server.count_refusal(decision.status)
        return Answer(
            decision.status,
            decision.body,
            [*decision.headers, *cors_headers],
            content_type=decision.content_type,
        )
    return _capacity(server, target, cors_headers) or _open(
        target, cors_headers, asked.last_event_id, head=asked.head
    )


def _open(target: Target, cors_headers: Headers, resume: str | None, *, head: bool) -> OpenStream:
    """The stream, on its channel: a key's is made now if it has none (the
    caller checked there is room), in the step that subscribes to it."""
    if isinstance(target, Channel):
        return OpenStream(target, cors_headers, resume)
    family, key = target.family, target.key
    return OpenStream(family.live(key) if head else family.open(key), cors_headers, resume)


def _route_of(target: Target) -> RouteConfig:
    return target.route if isinstance(target, Channel) else target.family.route


def _in_force(server: Server, target: Target) -> bool:
    if isinstance(target, Channel):
        return server.channels.get(target.route.path) is target
    family = target.family
    # A reload during forward-auth may have narrowed the key's pattern: a key
    # the new template refuses must not get a channel now.
    return server.keyed.get(family.route.path) is family and family.still_matches(target.key)


def last_event_id(request: Incoming) -> str | None:
    """The resume point: the Last-Event-ID header, else a query parameter."""
    header = request.header(b"last-event-id")
    if header:  # the header wins over the query parameter
        return header.decode("utf-8", errors="replace")
    query = request.checked.target.query
    if query:
        params = parse_qs(query, keep_blank_values=False)
        for name in LAST_EVENT_ID_PARAMS:
            if name in params:
                return params[name][0]
    return None


def _not_a_route(server: Server, request: Incoming) -> Admission:
    """A protected route's variant is refused; anything else is not ours."""
    target = request.checked.target
    closing = server.draining  # no keep-alive into a process that is leaving
    if target.form is TargetForm.ASTERISK:
        # OPTIONS * asks what the server as a whole allows (RFC 9110 §9.3.7).
        return NotARoute(Answer(204, headers=[(b"allow", cors.ALLOWED_METHODS)], close=closing))
    claimed = server.claimed_by(target.path)
    if claimed is not None:
        # A template's path with a key it refuses ("..", "%2F", NUL, too
        # long, another case): never the app's to see.
        server.count_refusal(404)
        log.info(
            "peer=%s refused (404): no valid key for route %s (key.pattern %s)",
            request.peer,
            claimed.route.path,
            claimed.route.key.pattern,
        )
        return Answer(
            404,
            f"404 not found: not a valid key for {claimed.route.path}\n".encode(),
            close=closing,
        )
    protected = server.variant_of(target.path)
    if protected is not None:
        # An app that routes case-insensitively, or cuts the path at a NUL,
        # would serve its own stream here: past the fan-out and past
        # forward-auth. See docs/request-checks.md.
        server.count_refusal(404)
        log.info(
            "peer=%s refused (404): a variant of route %s (protect_variants)",
            request.peer,
            protected,
        )
        return Answer(
            404,
            b"404 not found: this path differs from a stream route only in case or"
            b" in invisible characters\n",
            close=closing,
        )
    fed = server.upstream_path_of(target.path)
    if fed is not None:
        server.count_refusal(404)
        log.info(
            "peer=%s refused (404): the app's upstream endpoint of route %s (protect_variants)",
            request.peer,
            fed,
        )
        return Answer(
            404,
            f"404 not found: this is the app's stream endpoint; subscribe to {fed}\n".encode(),
            close=closing,
        )
    return NotARoute(Answer(404, f"404 no route for {target.path}\n".encode(), close=closing))


def _preflight(server: Server, route: RouteConfig, request: Incoming) -> Answer:
    route_cors = route.cors
    origin = request.header(b"origin")
    if route_cors is None or origin is None:
        return Answer(204, headers=[(b"allow", cors.ALLOWED_METHODS)])
    headers = cors.preflight_headers(route_cors, origin)
    if headers is None:
        server.count_refusal(403)
        return Answer(403, b"403 origin not allowed\n")
    return Answer(204, headers=headers)


def _stream(server: Server, target: Target, request: Incoming) -> Admission:
    route = _route_of(target)
    cors_headers = cors.response_headers(route.cors, request.header(b"origin"))
    if cors_headers is None:
        server.count_refusal(403)
        return Answer(403, f"403 origin not allowed on {route.path}\n".encode())
    auth = server.auth.get(route.path)
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
        return _refusal(server, target, RefusalReason.AUTH_UNAVAILABLE, cors_headers)
    refused = _capacity(server, target, cors_headers)
    if refused is not None:
        return refused  # and no auth call for a stream that could not open anyway
    resume = last_event_id(request)
    if auth is None:
        return _open(target, cors_headers, resume, head=request.method == b"HEAD")
    # Forward-auth is asked about the concrete path: a template's key is part
    # of what it decides (and of its cache key), so /jobs/1 never admits /jobs/2.
    path = route.path if isinstance(target, Channel) else target.family.path_of(target.key)
    credential = auth.credential(
        as_read(request),
        path,
        request.checked.target.query,
        peer_ip=request.peer_ip,
        scheme=request.scheme,
        volatile_params=LAST_EVENT_ID_PARAMS,
    )
    return Authorize(
        auth, credential, target, cors_headers, resume, request.peer, request.method == b"HEAD"
    )


def _capacity(server: Server, target: Target, cors_headers: Headers) -> Answer | None:
    """The answer if the route (or key) can't take a stream now, else None."""
    if isinstance(target, Channel):
        channel: Channel | None = target
    else:
        family, key = target.family, target.key
        gone = family.gone(key)
        if gone is not None:
            # The app said the key is unknown (404, 410) or stopped (204) a
            # moment ago: told from memory, the app is not asked again.
            return _gone(gone, family.route.path, cors_headers)
        channel = family.live(key)
    if channel is not None and channel.stopped_by_upstream:
        # The app said "stop" (204); pass it on so browsers stop reconnecting.
        return Answer(204, headers=cors_headers)
    if server.draining:
        # Shutting down: a stream opened now would only be cut; send the
        # client to the next instance after a short pause instead.
        return _refusal(server, target, RefusalReason.SHUTTING_DOWN, cors_headers)
    if channel is not None:
        if not channel.admits():
            return _refusal(server, target, RefusalReason.MAX_CLIENTS, cors_headers)
        return None
    assert isinstance(target, KeyTarget)
    if not target.family.admits():
        return _refusal(server, target, RefusalReason.MAX_CLIENTS, cors_headers)
    if not target.family.has_room():
        return _refusal(server, target, RefusalReason.MAX_CHANNELS, cors_headers)
    return None


def _gone(status: int, route: str, cors_headers: Headers) -> Answer:
    if status == 204:
        return Answer(204, headers=cors_headers)
    return Answer(
        status,
        f"{status} the app has no stream for this key of {route}\n".encode(),
        cors_headers,
    )


def _refusal(
    server: Server, target: Target, reason: RefusalReason, cors_headers: Headers
) -> Answer:
    """A stream refused for a temporary reason, so that the client retries.

    By default (`refuse: retry`) the answer is a short 200 event stream that
    EventSource reconnects after (refusal.py says why); `refuse: status` gives
    SDKs a plain 503 with Retry-After. During a drain the connection closes
    after it, so nothing reuses it into this process.
    """
    if isinstance(target, Channel):
        route = target.route
        target.refused(reason)
    else:
        route = target.family.route
        target.family.refused(reason)
    closing = server.draining
    if route.refuse == "status":
        server.count_refusal(503)
        retry_after = str(reason.retry_after_seconds).encode("ascii")
        return Answer(
            503,
            f"503 {reason.value.replace('_', ' ')} on {route.path}, retry shortly\n".encode(),
            [(b"retry-after", retry_after), *cors_headers],
            close=closing,
        )
    return Answer(
        200,
        refusal_body(reason, server.rng),
        STREAM_HEADERS[1:] + cors_headers,
        close=closing,
        content_type=STREAM_CONTENT_TYPE,
    )


def as_read(request: Incoming) -> Headers:
    """The request's headers with the Host it is for (check_request's reading).

    With an absolute-form target the target's authority is the host, whatever
    the Host header says (RFC 9112 §3.2.2): forward-auth's X-Forwarded-Host
    must name the host the stream was asked of, as the pass-through's does.
    """
    authority = request.checked.target.authority
    if authority is None:
        return request.headers
    return [(b"host", authority)] + [
        (name, value) for name, value in request.headers if name.lower() != b"host"
    ]
