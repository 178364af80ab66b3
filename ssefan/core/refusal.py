"""Temporary refusals of a stream, in a form a browser's EventSource retries.

WHATWG HTML §9.2.2: an EventSource whose response is not `200` with
`text/event-stream` *fails* the connection (readyState CLOSED, never
reconnects); a body that ends after a good head *reestablishes* it after the
reconnection time. So "try again later" to a browser is a short stream: `200
text/event-stream`, a jittered `retry:` (spread, so a refused crowd does not
come back in lock-step), one named event saying why, then the end of the body.

Browsers keep the last `retry:` for the EventSource's whole life (Chromium and
Firefox alike), which is why every real stream starts with the route's own
`retry:` again (RouteConfig.retry). Values stay ≥ 500 ms: Firefox raises
anything smaller to 500, Chromium obeys even 0.
"""

from __future__ import annotations

import enum
import json
import random

from ssefan.core.sse import Event, encode, encode_comment

__all__ = ["OPENING_COMMENT", "REFUSAL_EVENT", "RefusalReason", "refusal_body"]

# The named event a refused client receives; its data is JSON
# {"reason": <RefusalReason value>, "retry_ms": <the retry it was given>}.
REFUSAL_EVENT = "ssefan-retry"


class RefusalReason(enum.StrEnum):
    # The process is draining: the next instance takes the reconnect. The
    # drain's own stream endings use this range too (ops.drain.DRAIN_RETRY_MS).
    SHUTTING_DOWN = "shutting_down"
    # max_clients (the route's or the global one) is reached. Slots free as
    # clients leave; 2-8 s spreads a crowd over several seconds of churn.
    MAX_CLIENTS = "max_clients"
    # A template route's new key past max_channels (route or global).
    MAX_CHANNELS = "max_channels"
    # Forward-auth did not answer in time, failed, or is saturated.
    AUTH_UNAVAILABLE = "auth_unavailable"
    # A reload replaced the route (or its auth) while forward-auth decided:
    # the new settings are in force already, so come back almost at once.
    RECONFIGURED = "reconfigured"

    @property
    def retry_range_ms(self) -> tuple[int, int]:
        return _RETRY_RANGE_MS[self]

    @property
    def retry_after_seconds(self) -> int:
        """The Retry-After of the plain-status form (`refuse: status`)."""
        return max(1, round(self.retry_range_ms[1] / 1000))


_RETRY_RANGE_MS: dict[RefusalReason, tuple[int, int]] = {
    RefusalReason.SHUTTING_DOWN: (1000, 3000),
    RefusalReason.MAX_CLIENTS: (2000, 8000),
    # Channels free as keys' last clients leave plus linger: seconds, not ms.
    RefusalReason.MAX_CHANNELS: (2000, 8000),
    RefusalReason.AUTH_UNAVAILABLE: (2000, 8000),
    RefusalReason.RECONFIGURED: (500, 1500),
}

# What every stream ssefan answers starts with, a refusal too: written with
# the headers so that intermediaries flush them at once.
OPENING_COMMENT = encode_comment("ssefan")


def refusal_body(reason: RefusalReason, rng: random.Random) -> bytes:
    """The whole body of a refusal stream, with a freshly jittered `retry:`."""
    retry_ms = rng.randint(*reason.retry_range_ms)
    data = json.dumps({"reason": reason.value, "retry_ms": retry_ms}, separators=(",", ":"))
    # No `id:` field: the client's last event id (its resume point) stays as it was.
    return OPENING_COMMENT + encode(Event(data, event=REFUSAL_EVENT, retry=retry_ms))
