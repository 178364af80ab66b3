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

The parts: keys (Credential, and the keyed hash it is known by), decision
(AuthDecision, UNAVAILABLE, AuthStats), cache (the TTL-LRUs of admits and
denials), asker (the HTTP call, on http.pool), revalidation (the re-ask
timer). ForwardAuth here puts them together per route: ask, cache, coalesce,
revalidate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence

from ssefan.config import AuthConfig, Config, RouteConfig
from ssefan.edge.auth.asker import MAX_AUTH_BODY, MAX_CONCURRENT_ASKS, Asker
from ssefan.edge.auth.cache import (
    DENIAL_CACHE_BYTES,
    MAX_CACHED_ADMITS,
    MAX_CACHED_DENIALS,
    DecisionCache,
)
from ssefan.edge.auth.decision import UNAVAILABLE, AuthDecision, AuthStats
from ssefan.edge.auth.keys import Credential, CredentialKeys
from ssefan.edge.auth.revalidation import REVALIDATE_CONCURRENCY, Revalidation
from ssefan.http.client import Origin
from ssefan.http.forwarding import Header, TrustedProxies
from ssefan.http.pool import ConnectionPool

__all__ = [
    "AUTH_POOL_SIZE",
    "DENIAL_CACHE_BYTES",
    "MAX_AUTH_BODY",
    "MAX_CACHED_ADMITS",
    "MAX_CACHED_DENIALS",
    "MAX_CONCURRENT_ASKS",
    "REVALIDATE_CONCURRENCY",
    "UNAVAILABLE",
    "AuthDecision",
    "AuthStats",
    "Credential",
    "ForwardAuth",
    "forward_auth",
    "forward_auths",
    "unused_pools",
]

# Idle keep-alive connections to one auth endpoint.
AUTH_POOL_SIZE = 8


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
        self._config = config
        self.pool = pool
        self.trusted = trusted
        self.clock = clock
        self.stats = AuthStats()
        self._keys = CredentialKeys(config, trusted)
        # The cache's bounds are this package's names, read as each ForwardAuth
        # is made (so they can be set on ssefan.edge.auth, as tests do).
        self._cache = DecisionCache(
            clock,
            max_admits=MAX_CACHED_ADMITS,
            max_denials=MAX_CACHED_DENIALS,
            max_denial_bytes=DENIAL_CACHE_BYTES,
        )
        self._asker = Asker(route, config, pool, self.stats, clock=clock)
        self._asking: dict[bytes, asyncio.Task[AuthDecision]] = {}
        self._revalidation = Revalidation(route, config, self.stats, recheck=self._recheck)

    @property
    def config(self) -> AuthConfig:
        return self._config

    @config.setter
    def config(self, config: AuthConfig) -> None:
        # Every part reads its settings at use (timeout, cache, revalidate,
        # token_param), so new ones take effect from the next ask on.
        self._config = self._keys.config = self._asker.config = config
        self._revalidation.config = config

    # -- who is asking ----------------------------------------------------------------

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
        return self._keys.credential(
            request_headers,
            path,
            query,
            peer_ip=peer_ip,
            scheme=scheme,
            volatile_params=volatile_params,
        )

    # -- deciding ---------------------------------------------------------------------

    async def decide(self, credential: Credential, *, fresh: bool = False) -> AuthDecision:
        """The decision for `credential`: cached, joined to an ask in flight, or asked.

        `fresh` skips the cache (revalidation) but still joins an ask in flight.
        """
        key = credential.key
        if not fresh:
            cached = self._cache.get(key)
            if cached is not None:
                self.stats.cache_hits += 1
                return cached
        task = self._asking.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._asker.ask(credential))
            self._asking[key] = task
            task.add_done_callback(lambda done: self._asked(key, done))
        # Shielded: one client leaving must not cancel the answer others wait for.
        return await asyncio.shield(task)

    def _recheck(self, credential: Credential) -> Awaitable[AuthDecision]:
        return self.decide(credential, fresh=True)

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
            self._cache.put(key, decision, self.config.cache)

    @property
    def cached(self) -> tuple[int, int, int]:
        """(admits, denials, denial body bytes) held in the decision cache."""
        return self._cache.held

    # -- revalidation -----------------------------------------------------------------

    def watch(self, credential: Credential, end: Callable[[], None]) -> Callable[[], None]:
        """Call `end` if `credential` stops being admitted; returns the unwatch function."""
        return self._revalidation.watch(credential, end)

    @property
    def watched_credentials(self) -> int:
        return self._revalidation.watched_credentials

    def start(self) -> None:
        self._revalidation.start()

    def close(self) -> None:
        self._revalidation.close()
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
