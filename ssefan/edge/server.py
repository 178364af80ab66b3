"""The client-facing server: state shared by a listener's connections, and routing.

A connection (protocol.py, the HTTP/1.1 adapter) asks the `Server` which
stream route a path means, whether a path that is no route is a protected
route's variant or the app's own stream endpoint (both answered 404, never
passed through: docs/request-checks.md), and where everything else goes (the
demo's fallback, the pass-through). What a stream request gets is decided in
admission.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import h11

from ssefan.config import Config
from ssefan.core.paths import routing_path, variant_path
from ssefan.core.template import ChannelKey
from ssefan.edge.auth import ForwardAuth
from ssefan.edge.downstream import Downstream
from ssefan.edge.http2 import HTTP2Connection
from ssefan.edge.protocol import HTTPConnection
from ssefan.http.request_checks import CheckedRequest
from ssefan.stream.channel import Channel
from ssefan.stream.keyed import KeyedChannels

__all__ = ["HTTPConnection", "Server"]


@dataclass
class Server:
    """State shared by every connection of one listener."""

    config: Config
    channels: dict[str, Channel]
    connections: set[HTTPConnection | HTTP2Connection] = field(default_factory=set)
    # Counters for refusals, by status code.
    refused: dict[int, int] = field(default_factory=dict)
    # HTTP/2 counters by name: connections, resets_sent, goaway_<reason>.
    http2: dict[str, int] = field(default_factory=dict)
    _none_left: asyncio.Event | None = None  # set when the last connection goes
    # Called for requests to paths that are not stream routes; True if it answered
    # (the demo serves its page this way).
    fallback: Callable[[Downstream, h11.Request], bool] | None = None
    # Then the pass-through to the app (proxy.Proxy.forward), if `app` is set:
    # the connection is handed off to it until the exchange ends. It forwards
    # the target and host as check_request read them, which is what routing
    # went by: the app never reads a request other than ssefan did.
    pass_through: (
        Callable[[Downstream, h11.Request, CheckedRequest], Coroutine[Any, Any, None]] | None
    ) = None
    # Template routes' channels by route path (`/jobs/{job}/progress`).
    keyed: dict[str, KeyedChannels] = field(default_factory=dict)
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

    def template(self, path: str, query: str) -> tuple[KeyedChannels, ChannelKey] | None:
        """The template route and key a request means, if any (path as sent)."""
        if not self.keyed:
            return None
        form = routing_path(path)
        for family in self.keyed.values():
            key = family.match(form, query)
            if key is not None:
                return family, key
        return None

    def claimed_by(self, path: str) -> KeyedChannels | None:
        """The template route whose path this is although its key was refused.

        Such a request (`/jobs/../progress`, `/jobs/%00/progress`, an over-long
        key) is answered 404 and never passed through: a key the template
        refuses must not reach the app another way. With protect_variants,
        the path's variant forms (case, invisible characters) are claimed too.
        """
        if not self.keyed:
            return None
        form = routing_path(path)
        for family in self.keyed.values():
            if family.claims(form):
                return family
            if family.route.protect_variants and family.claims_variant(variant_path(path)):
                return family
        return None

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

    def connection_lost(self, connection: HTTPConnection | HTTP2Connection) -> None:
        self.connections.discard(connection)
        if not self.connections and self._none_left is not None:
            self._none_left.set()

    async def connections_gone(self) -> None:
        """Return once no client connection is open (App.stop waits, bounded)."""
        if self.connections:
            self._none_left = asyncio.Event()
            await self._none_left.wait()

    def count_http2(self, name: str) -> None:
        self.http2[name] = self.http2.get(name, 0) + 1

    def count_refusal(self, status: int) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1


def _origin(url: str) -> tuple[str, str, int | None]:
    """scheme, host and port of `url`, the port made explicit (RFC 6454 §4)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port
