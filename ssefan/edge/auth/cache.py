"""Decisions remembered per credential key: two TTL-LRUs, admits and denials apart.

A reconnect storm of ten thousand tabs of one user costs one auth call while
the decision is fresh. Admits and denials are kept apart, each its own LRU,
so a flood of made-up cookies only evicts other denials, never a real user's
admit; denials (which carry a body) are bounded in bytes as well as in count.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from ssefan.edge.auth.decision import AuthDecision

__all__ = ["DENIAL_CACHE_BYTES", "MAX_CACHED_ADMITS", "MAX_CACHED_DENIALS", "DecisionCache"]

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


class DecisionCache:
    """Admits and denials (401/403) by credential key, each with its expiry."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        max_admits: int,
        max_denials: int,
        max_denial_bytes: int,
    ) -> None:
        self.clock = clock
        self.max_admits = max_admits
        self.max_denials = max_denials
        self.max_denial_bytes = max_denial_bytes
        # key -> (expires, decision), least recently used first.
        self._admits: OrderedDict[bytes, tuple[float, AuthDecision]] = OrderedDict()
        self._denials: OrderedDict[bytes, tuple[float, AuthDecision]] = OrderedDict()
        self._denial_bytes = 0

    def get(self, key: bytes) -> AuthDecision | None:
        """The fresh decision for `key` (now the most recently used), or None."""
        for cache in (self._admits, self._denials):
            entry = cache.get(key)
            if entry is None:
                continue
            if entry[0] > self.clock():
                cache.move_to_end(key)
                return entry[1]
            self.forget(key)
        return None

    def put(self, key: bytes, decision: AuthDecision, ttl: float) -> None:
        """Remember a cacheable decision for `ttl` seconds, dropping the least
        recently used to make room (a denial too big for the budget is not kept)."""
        self.forget(key)
        expires = self.clock() + ttl
        if decision.admitted:
            while len(self._admits) >= self.max_admits:
                self._admits.popitem(last=False)  # the least recently used
            self._admits[key] = (expires, decision)
            return
        size = denial_size(decision)
        if size > self.max_denial_bytes:
            return
        while self._denials and (
            len(self._denials) >= self.max_denials
            or self._denial_bytes + size > self.max_denial_bytes
        ):
            _, (_, dropped) = self._denials.popitem(last=False)
            self._denial_bytes -= denial_size(dropped)
        self._denials[key] = (expires, decision)
        self._denial_bytes += size

    def forget(self, key: bytes) -> None:
        self._admits.pop(key, None)
        entry = self._denials.pop(key, None)
        if entry is not None:
            self._denial_bytes -= denial_size(entry[1])

    @property
    def held(self) -> tuple[int, int, int]:
        """(admits, denials, denial body bytes) held."""
        return len(self._admits), len(self._denials), self._denial_bytes


def denial_size(decision: AuthDecision) -> int:
    """What a cached denial costs, as counted against DENIAL_CACHE_BYTES."""
    headers = sum(len(name) + len(value) for name, value in decision.headers)
    return len(decision.body) + headers + len(decision.content_type)
