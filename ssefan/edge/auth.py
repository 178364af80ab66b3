"""Forward-auth for stream routes: before a stream opens, the app says who may listen.

`EventSource` can't set headers, and only the app knows its sessions. So for
each new stream ssefan sends a GET to the route's `auth.url` carrying the
client's configured credential headers (and a `?token=` moved into a header),
plus where the client wanted to go:

* 2xx admits; 401/403 go back to the client as they came (status,
  WWW-Authenticate, body), with no stream; anything else, or no answer within
  `auth.timeout`, is a 503.
* Decisions are cached per credential for `auth.cache`, and concurrent asks
  for one credential share a single request: a reconnect storm of ten
  thousand tabs of one user costs one auth call. Admits and denials are kept
  apart (each its own LRU), so a flood of made-up cookies only evicts other
  denials, never a real user's admit. A request without any credential is
  keyed by the client address the auth endpoint sees as well, so an endpoint
  that admits by address doesn't have its answer served to everyone.
* At most MAX_CONCURRENT_ASKS asks per route are in flight; beyond that a
  new credential waits its turn within `auth.timeout`, then gets a 503.
* With `revalidate`, one timer per route re-asks once per distinct credential
  with open streams, and ends the streams of credentials now refused.

A credential is identified by a keyed hash (HMAC-SHA256, key made per
process) of what is sent to the auth endpoint: the raw values are never a log
field, a metric label or a dict key, and a logged fingerprint can't be matched
offline against a guessed cookie.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import h11

from ssefan.config import AuthConfig, Config, RouteConfig
from ssefan.http.forwarding import (
    Header,
    TrustedProxies,
    describe_exception,
    forwarded_headers,
    header_values,
    new_request_id,
    without_params,
)
from ssefan.http.pool import (
    ConnectionPool,
    Origin,
    OriginClosed,
    OriginConnection,
    OriginProtocolError,
)

__all__ = [
    "AuthDecision",
    "Credential",
    "ForwardAuth",
    "forward_auth",
    "forward_auths",
    "unused_pools",
]

log = logging.getLogger("ssefan.auth")

# The body of a 401/403 passed on to the client is read up to this size. It
# is a login hint or an error page, not content; a bigger one is replaced by
# a plain reason rather than held in memory per waiting client.
MAX_AUTH_BODY = 16 * 1024
# Admits remembered per route (least recently used dropped first). An admit
# holds no body: key, entry and decision are ~300 bytes, so 10 000 bound the
# cache near 3 MiB per route while covering every user of a busy instance
# within `cache`.
MAX_CACHED_ADMITS = 10_000
# Denials (401/403, each with its body of up to MAX_AUTH_BODY) are kept apart
# from admits, so made-up credentials evict only other denials, in an LRU of
# at most this many entries and this many body bytes per route: a denial
# worth caching is a reconnect loop of one refused client, a few at a time.
MAX_CACHED_DENIALS = 1_000
DENIAL_CACHE_BYTES = 1024 * 1024
# Asks in flight at once per route. Each is an outbound connection (the pool
# keeps only AUTH_POOL_SIZE idle ones), so without a cap N distinct made-up
# credentials would open N connections to the auth endpoint at once. 64 keeps
# a busy instance's cold start fast (asks take milliseconds); a credential
# beyond it waits for a free slot within `auth.timeout`, then gets a 503.
MAX_CONCURRENT_ASKS = 64
# Re-asks in flight at once during a revalidation pass, so a route with
# thousands of distinct users doesn't hit the auth endpoint all at once.
REVALIDATE_CONCURRENCY = 16
# Idle keep-alive connections to one auth endpoint.
AUTH_POOL_SIZE = 8
USER_AGENT = b"ssefan"

# Client headers that go into the auth request's X-Forwarded-* (nothing else
# the client sent reaches the auth endpoint unless `forward` names it).
_IDENTITY_INPUT = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)
_ADMIT_OR_DENY = (401, 403)


@dataclass(frozen=True, slots=True)
class AuthDecision:
    """What the auth endpoint said, as it is passed on to the client."""

    status: int
    headers: tuple[Header, ...] = ()
    body: bytes = b""
    content_type: bytes = b"text/plain; charset=utf-8"

    @property
    def admitted(self) -> bool:
        return 200 <= self.status < 300

    @property
    def cacheable(self) -> bool:
        return self.admitted or self.status in _ADMIT_OR_DENY


# The auth endpoint could not decide (timeout, failure, saturation, an answer
# other than 2xx/401/403). Never passed on as it is: the server answers it as
# a temporary refusal (RefusalReason.AUTH_UNAVAILABLE), which clients retry.
UNAVAILABLE = AuthDecision(503)


@dataclass(frozen=True, slots=True)
class Credential:
    """What identifies one client to the auth endpoint, and how to ask about it.

    `headers` holds cookie and token values: never log or print it (its repr
    is hidden). `fingerprint` is what log lines show.
    """

    key: bytes
    headers: tuple[Header, ...] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return self.key.hex()[:12]


@dataclass(slots=True)
class _Watched:
    credential: Credential
    ends: set[Callable[[], None]] = field(default_factory=set)


@dataclass
class AuthStats:
    """Plain counters, rendered on scrape."""

    asks: int = 0  # requests sent to the auth endpoint
    cache_hits: int = 0
    admitted: int = 0
    denied: int = 0
    unavailable: int = 0
    saturated: int = 0  # asks not sent: MAX_CONCURRENT_ASKS were in flight (also unavailable)
    revoked: int = 0  # streams ended by revalidation


class ForwardAuth:
    """One route's forward-auth: ask, cache, coalesce, revalidate."""

    def __init__(
        self,
        route: str,
        config: AuthConfig,
        pool: ConnectionPool,
        *,
        trusted: TrustedProxies,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.route = route
        self.config = config
        self.pool = pool
        self.trusted = trusted
        self.clock = clock
        parts = urlsplit(config.url)
        self._target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode()
        self._forward = tuple(name.lower().encode("ascii") for name in config.forward)
        self._token_header = config.token_header.encode("ascii")
        self._secret = secrets.token_bytes(32)
        # key -> (expires, decision), least recently used first.
        self._admits: OrderedDict[bytes, tuple[float, AuthDecision]] = OrderedDict()
        self._denials: OrderedDict[bytes, tuple[float, AuthDecision]] = OrderedDict()
        self._denial_bytes = 0
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_ASKS)
        self._saturation_logged = -math.inf
        self._asking: dict[bytes, asyncio.Task[AuthDecision]] = {}
        self._watched: dict[bytes, _Watched] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._revalidation: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = AuthStats()

    # -- who is asking --------------------------------------------------------------

    def credential(
        self,
        request_headers: Sequence[Header],
        path: str,
        query: str,
        *,
        peer_ip: str,
        scheme: str,
        volatile_params: Iterable[str] = (),
    ) -> Credential:
        """The credential of a stream request, and the auth request that asks about it.

        `volatile_params` (the resume cursor) change on every reconnect and say
        nothing about who the client is: they are kept out of the cache key.
        """
        sent: list[Header] = [
            (name, bytes(value)) for name, value in request_headers if name.lower() in self._forward
        ]
        token = self._query_token(query)
        if token is not None and not header_values(sent, self._token_header):
            # A real header wins: the parameter is the fallback for EventSource.
            sent.append((self._token_header, token))
        # The token moved into a header: it has no business in X-Forwarded-Uri,
        # where auth endpoints tend to log it.
        uri_query = without_params(query, [self.config.token_param or ""])
        uri = path + (f"?{uri_query}" if uri_query else "")
        key_query = without_params(uri_query, volatile_params)
        # Who and where the client is, as for proxied requests (trusted peers'
        # chains extended, anyone else's claims replaced).
        identity = [(n, v) for n, v in request_headers if n.lower() in _IDENTITY_INPUT]
        where = [
            (name, value)
            for name, value in forwarded_headers(
                identity, peer_ip=peer_ip, scheme=scheme, trusted=peer_ip in self.trusted
            )
            if name.lower() != b"host"
        ]
        # Without a credential, the client's address is all the endpoint can
        # decide by (admitting an internal network, say): it is part of the
        # key then, or one address's admit would be served to everyone. With a
        # credential it is not, so one user's tabs on several networks (or
        # behind a changing NAT address) still share one decision.
        key = self._key(sent if sent else where, path + (f"?{key_query}" if key_query else ""))
        context: list[Header] = [
            (b"X-Forwarded-Method", b"GET"),
            (b"X-Forwarded-Uri", uri.encode("utf-8", "replace")),
            *where,
        ]
        return Credential(key, tuple(sent + context))

    def _query_token(self, query: str) -> bytes | None:
        name = self.config.token_param
        if not name or name not in query:
            return None
        values = parse_qs(query, keep_blank_values=False).get(name)
        if not values:
            return None
        token = values[0]
        value = f"{self.config.token_scheme} {token}" if self.config.token_scheme else token
        # h11 refuses CR, LF, NUL and edge whitespace in header values; such a
        # "token" is no credential and is not forwarded.
        if value != value.strip() or any(c in value for c in "\r\n\x00"):
            return None
        return value.encode("utf-8")

    def _key(self, sent: Sequence[Header], uri: str) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for name, value in sent:
            # Length-prefixed, so ("a", "bc") and ("ab", "c") can't collide.
            for part in (name.lower(), value):
                mac.update(len(part).to_bytes(4, "big"))
                mac.update(part)
        encoded = uri.encode("utf-8", "replace")
        mac.update(len(encoded).to_bytes(4, "big"))
        mac.update(encoded)
        return mac.digest()

    # -- deciding ---------------------------------------------------------------------

    async def decide(self, credential: Credential, *, fresh: bool = False) -> AuthDecision:
        """The decision for `credential`: cached, joined to an ask in flight, or asked.

        `fresh` skips the cache (revalidation) but still joins an ask in flight.
        """
        key = credential.key
        if not fresh:
            cached = self._cached(key)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
        task = self._asking.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(credential))
            self._asking[key] = task
            task.add_done_callback(lambda done: self._asked(key, done))
        # Shielded: one client leaving must not cancel the answer others wait for.
        return await asyncio.shield(task)

    def _asked(self, key: bytes, task: asyncio.Task[AuthDecision]) -> None:
        self._asking.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        decision = task.result()
        if decision.admitted:
            self.stats.admitted += 1
        elif decision.cacheable:
            self.stats.denied += 1
        else:
            self.stats.unavailable += 1
        if decision.cacheable and self.config.cache > 0:
            self._forget(key)
            expires = self.clock() + self.config.cache
            if decision.admitted:
                while len(self._admits) >= MAX_CACHED_ADMITS:
                    self._admits.popitem(last=False)  # the least recently used
                self._admits[key] = (expires, decision)
            else:
                size = _denial_size(decision)
                if size > DENIAL_CACHE_BYTES:
                    return
                while self._denials and (
                    len(self._denials) >= MAX_CACHED_DENIALS
                    or self._denial_bytes + size > DENIAL_CACHE_BYTES
                ):
                    _, (_, dropped) = self._denials.popitem(last=False)
                    self._denial_bytes -= _denial_size(dropped)
                self._denials[key] = (expires, decision)
                self._denial_bytes += size

    def _cached(self, key: bytes) -> AuthDecision | None:
        for cache in (self._admits, self._denials):
            entry = cache.get(key)
            if entry is None:
                continue
            if entry[0] > self.clock():
                cache.move_to_end(key)
                return entry[1]
            self._forget(key)
        return None

    def _forget(self, key: bytes) -> None:
        self._admits.pop(key, None)
        entry = self._denials.pop(key, None)
        if entry is not None:
            self._denial_bytes -= _denial_size(entry[1])

    @property
    def cached(self) -> tuple[int, int, int]:
        """(admits, denials, denial body bytes) held in the decision cache."""
        return len(self._admits), len(self._denials), self._denial_bytes

    async def _ask(self, credential: Credential) -> AuthDecision:
        request_id = new_request_id()
        timeout = self.config.timeout
        # One deadline for waiting for a slot and for the answer: a client
        # hears back within `auth.timeout` either way.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
            if loop.time() >= deadline:  # a slot, but no time left to use it
                self._slots.release()
                raise TimeoutError
        except TimeoutError:
            self.stats.saturated += 1
            self._log_saturation()
            return UNAVAILABLE
        self.stats.asks += 1
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    decision = await self._ask_once(credential, request_id)
            finally:
                self._slots.release()
        except TimeoutError:
            reason = f"no answer within {timeout:g}s"
        except (OSError, OriginProtocolError) as exc:
            reason = describe_exception(exc)
        else:
            log.debug(
                "route=%s auth request=%s credential=%s -> %d",
                self.route,
                request_id,
                credential.fingerprint,
                decision.status,
            )
            if decision.admitted or decision.cacheable:
                return decision
            reason = f"status {decision.status}"
        log.warning(
            "route=%s auth request=%s to %s failed: %s (clients told to retry: auth_unavailable)",
            self.route,
            request_id,
            self.pool.origin,
            reason,
        )
        return UNAVAILABLE

    def _log_saturation(self) -> None:
        # Once a minute at most: under a flood of made-up credentials this
        # would otherwise be a log line per refused client.
        now = self.clock()
        if now - self._saturation_logged >= 60.0:
            self._saturation_logged = now
            log.warning(
                "route=%s %d auth requests in flight and none finished within %gs:"
                " new credentials get 503 (%d so far)",
                self.route,
                MAX_CONCURRENT_ASKS,
                self.config.timeout,
                self.stats.saturated,
            )

    async def _ask_once(self, credential: Credential, request_id: str) -> AuthDecision:
        headers: list[Header] = [
            (b"Host", self.pool.origin.host_header.encode("ascii")),
            (b"User-Agent", USER_AGENT),
            # Bodies are passed on as they are: no compression to undo.
            (b"Accept-Encoding", b"identity"),
            (b"X-Request-ID", request_id.encode("ascii")),
            *credential.headers,
        ]
        request = h11.Request(method="GET", target=self._target, headers=headers)
        for attempt in (1, 2):
            connection = await self.pool.acquire(fresh=attempt > 1)
            try:
                connection.write(request)
                connection.write(h11.EndOfMessage())
                return await self._read_decision(connection)
            except OriginClosed as closed:
                # RFC 9112 §9.3.1: a GET on a keep-alive connection the auth
                # endpoint closed meanwhile is safe to send again, once.
                if attempt == 1 and closed.early and connection.reused:
                    continue
                raise
            finally:
                self.pool.release(connection)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_decision(self, connection: OriginConnection) -> AuthDecision:
        while True:
            event = await connection.receive()
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise OriginProtocolError(f"{type(event).__name__} before a response")
        status = event.status_code
        body = bytearray()
        while len(body) <= MAX_AUTH_BODY:
            part = await connection.receive()
            if isinstance(part, h11.Data):
                body += part.data
            elif isinstance(part, h11.EndOfMessage):
                break
            else:
                raise OriginProtocolError(f"{type(part).__name__} in the body")
        if status not in _ADMIT_OR_DENY:
            return AuthDecision(status)  # admitted (2xx), or a failure: no body to pass on
        headers = event.headers.raw_items()
        passed_on = tuple(
            (b"www-authenticate", v) for v in header_values(headers, b"www-authenticate")
        )
        if len(body) > MAX_AUTH_BODY:
            reason = f"{status} {HTTPStatus(status).phrase}\n".encode()
            return AuthDecision(status, passed_on, reason)
        content_type = header_values(headers, b"content-type")
        return AuthDecision(
            status,
            passed_on,
            bytes(body),
            content_type[0] if content_type else b"text/plain; charset=utf-8",
        )

    # -- revalidation ---------------------------------------------------------------------

    def watch(self, credential: Credential, end: Callable[[], None]) -> Callable[[], None]:
        """Call `end` if `credential` stops being admitted; returns the unwatch function."""
        watched = self._watched.get(credential.key)
        if watched is None:
            watched = self._watched[credential.key] = _Watched(credential)
        watched.ends.add(end)

        def unwatch() -> None:
            entry = self._watched.get(credential.key)
            if entry is not None:
                entry.ends.discard(end)
                if not entry.ends:
                    del self._watched[credential.key]

        return unwatch

    @property
    def watched_credentials(self) -> int:
        return len(self._watched)

    def start(self) -> None:
        if self.config.revalidate is not None and not self._closed:
            self._schedule()

    def _schedule(self) -> None:
        assert self.config.revalidate is not None
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.config.revalidate, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        if not self._watched:
            self._schedule()
            return
        task = asyncio.get_running_loop().create_task(self._revalidate())
        self._revalidation = task
        task.add_done_callback(self._revalidated)

    def _revalidated(self, task: asyncio.Task[None]) -> None:
        self._revalidation = None
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("route=%s auth revalidation failed", self.route, exc_info=exc)
        if not self._closed:
            self._schedule()

    async def _revalidate(self) -> None:
        """Re-ask once per distinct credential; end the streams of those refused now."""
        limit = asyncio.Semaphore(REVALIDATE_CONCURRENCY)

        async def recheck(key: bytes, watched: _Watched) -> None:
            async with limit:
                decision = await self.decide(watched.credential, fresh=True)
            if decision.status not in _ADMIT_OR_DENY:
                # Admitted, or the auth endpoint is down: streams already
                # admitted stay (ending them all on an outage would be a storm).
                return
            entry = self._watched.pop(key, None)
            if entry is None:
                return
            log.info(
                "route=%s credential=%s no longer admitted (%d): ending %d stream(s)",
                self.route,
                watched.credential.fingerprint,
                decision.status,
                len(entry.ends),
            )
            self.stats.revoked += len(entry.ends)
            for end in list(entry.ends):
                end()

        async with asyncio.TaskGroup() as group:
            for key, watched in list(self._watched.items()):
                group.create_task(recheck(key, watched))

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._revalidation is not None:
            self._revalidation.cancel()
        for task in list(self._asking.values()):
            task.cancel()
        # The pool is shared with other routes' ForwardAuth: its owner closes it.


def forward_auth(
    route: RouteConfig, config: Config, pools: dict[Origin, ConnectionPool]
) -> ForwardAuth:
    """`route`'s ForwardAuth, on the pool `pools` holds for its auth origin (made
    and added if missing). Pools are shared across routes and owned by the
    caller: closing a ForwardAuth leaves its pool open."""
    assert route.auth is not None
    origin = Origin.from_url(route.auth.url)
    pool = pools.get(origin)
    if pool is None:
        pool = pools[origin] = ConnectionPool(
            origin,
            size=AUTH_POOL_SIZE,
            idle_timeout=config.proxy.pool_idle_timeout,
            connect_timeout=route.auth.timeout,
        )
    return ForwardAuth(route.path, route.auth, pool, trusted=TrustedProxies(config.trusted_proxies))


def forward_auths(config: Config, pools: dict[Origin, ConnectionPool]) -> dict[str, ForwardAuth]:
    """A ForwardAuth per route that has `auth`, sharing a pool per auth origin."""
    return {
        route.path: forward_auth(route, config, pools)
        for route in config.routes
        if route.auth is not None
    }


def unused_pools(
    pools: dict[Origin, ConnectionPool], auths: Mapping[str, ForwardAuth]
) -> list[ConnectionPool]:
    """Remove and return the pools no ForwardAuth in `auths` uses (to be closed)."""
    used = {id(auth.pool) for auth in auths.values()}
    gone = [origin for origin, pool in pools.items() if id(pool) not in used]
    return [pools.pop(origin) for origin in gone]


def _denial_size(decision: AuthDecision) -> int:
    """What a cached denial costs, as counted against DENIAL_CACHE_BYTES."""
    headers = sum(len(name) + len(value) for name, value in decision.headers)
    return len(decision.body) + headers + len(decision.content_type)
