"""Revalidation: streams admitted once are asked about again, and ended if refused.

With `auth.revalidate`, one timer per route re-asks once per distinct
credential with open streams (skipping the cache, joining an ask in flight),
and ends the streams of credentials now refused (401/403). A credential the
auth endpoint can't decide about keeps its streams: ending them all on an
outage would be a reconnect storm.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ssefan.config import AuthConfig
from ssefan.edge.auth.decision import ADMIT_OR_DENY, AuthDecision, AuthStats
from ssefan.edge.auth.keys import Credential

__all__ = ["REVALIDATE_CONCURRENCY", "Revalidation"]

log = logging.getLogger("ssefan.auth")

# Re-asks in flight at once during a revalidation pass, so a route with
# thousands of distinct users doesn't hit the auth endpoint all at once.
REVALIDATE_CONCURRENCY = 16


@dataclass(slots=True)
class _Watched:
    credential: Credential
    ends: set[Callable[[], None]] = field(default_factory=set)


class Revalidation:
    """One route's watched credentials, and the timer that re-asks about them."""

    def __init__(
        self,
        route: str,
        config: AuthConfig,
        stats: AuthStats,
        *,
        recheck: Callable[[Credential], Awaitable[AuthDecision]],
    ) -> None:
        self.route = route
        self.config = config  # `revalidate` is read at each scheduling
        self.stats = stats
        self.recheck = recheck  # a fresh decision (ForwardAuth.decide(..., fresh=True))
        self._watched: dict[bytes, _Watched] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._revalidation: asyncio.Task[None] | None = None
        self._closed = False

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
                decision = await self.recheck(watched.credential)
            if decision.status not in ADMIT_OR_DENY:
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
        """No more passes: the timer and a pass under way are cancelled."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._revalidation is not None:
            self._revalidation.cancel()
