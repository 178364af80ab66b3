"""What forward-auth decided, and how often: the values every part of it shares."""

from __future__ import annotations

from dataclasses import dataclass

from ssefan.http.forwarding import Header

__all__ = ["ADMIT_OR_DENY", "UNAVAILABLE", "AuthDecision", "AuthStats"]

# The answers passed on to the client as they came (with WWW-Authenticate and
# body), and cached like an admit. Anything else but a 2xx is UNAVAILABLE.
ADMIT_OR_DENY = (401, 403)


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
        return self.admitted or self.status in ADMIT_OR_DENY


# The auth endpoint could not decide (timeout, failure, saturation, an answer
# other than 2xx/401/403). Never passed on as it is: the server answers it as
# a temporary refusal (RefusalReason.AUTH_UNAVAILABLE), which clients retry.
UNAVAILABLE = AuthDecision(503)


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
