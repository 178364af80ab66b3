"""The HTTP call to the auth endpoint: one GET per ask, on the route's pool.

At most MAX_CONCURRENT_ASKS asks per route are in flight; beyond that a new
credential waits its turn within `auth.timeout`, then gets UNAVAILABLE. The
answer is read as a decision: 2xx admits, 401/403 come back with their
WWW-Authenticate and body (up to MAX_AUTH_BODY), anything else, a failure or
no answer within `auth.timeout` is UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from urllib.parse import urlsplit

import h11

from ssefan.config import AuthConfig
from ssefan.edge.auth.decision import ADMIT_OR_DENY, UNAVAILABLE, AuthDecision, AuthStats
from ssefan.edge.auth.keys import Credential
from ssefan.http.client import OriginClosed, OriginConnection, OriginProtocolError
from ssefan.http.forwarding import Header, describe_exception, header_values, new_request_id
from ssefan.http.pool import ConnectionPool

__all__ = ["MAX_AUTH_BODY", "MAX_CONCURRENT_ASKS", "USER_AGENT", "Asker"]

log = logging.getLogger("ssefan.auth")

# The body of a 401/403 passed on to the client is read up to this size. It
# is a login hint or an error page, not content; a bigger one is replaced by
# a plain reason rather than held in memory per waiting client.
MAX_AUTH_BODY = 16 * 1024
# Asks in flight at once per route. Each is an outbound connection (the pool
# keeps only AUTH_POOL_SIZE idle ones), so without a cap N distinct made-up
# credentials would open N connections to the auth endpoint at once. 64 keeps
# a busy instance's cold start fast (asks take milliseconds); a credential
# beyond it waits for a free slot within `auth.timeout`, then gets a 503.
MAX_CONCURRENT_ASKS = 64
USER_AGENT = b"ssefan"


class Asker:
    """One route's asks: a slot each, one deadline, the request and its answer."""

    def __init__(
        self,
        route: str,
        config: AuthConfig,
        pool: ConnectionPool,
        stats: AuthStats,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.route = route
        self.config = config  # `timeout` is read at each ask
        self.pool = pool
        self.stats = stats
        self.clock = clock
        parts = urlsplit(config.url)
        self._target = ((parts.path or "/") + (f"?{parts.query}" if parts.query else "")).encode()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_ASKS)
        self._saturation_logged = -math.inf

    async def ask(self, credential: Credential) -> AuthDecision:
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
        if status not in ADMIT_OR_DENY:
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
