"""What an upstream says about itself: its state, and why its last attempt ended.

`UpstreamState` is the subscription's lifecycle; `LastFailure` is one record
of how the latest attempt failed (kind, a sentence for people, how many in a
row, when the next is due), which /readyz and the status page show;
`classify` turns the exception that ended an attempt into its kind and
sentence.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import socket
import ssl
import time

import h11

from ssefan.http.client import Origin, OriginClosed, OriginProtocolError
from ssefan.http.forwarding import describe_exception

__all__ = [
    "ATTEMPT_FAILURES",
    "FailureKind",
    "LastFailure",
    "UpstreamFailure",
    "UpstreamState",
    "classify",
]


class UpstreamState(enum.Enum):
    IDLE = "idle"  # not started (lazy route without clients)
    CONNECTING = "connecting"
    STREAMING = "streaming"
    BACKOFF = "backoff"
    STOPPED = "stopped"  # the app answered 204, or stop() was called


class FailureKind(enum.Enum):
    """Why an upstream attempt ended: what an operator would check first."""

    STATUS = "status"  # the app answered, but not 200 (or 204)
    CONTENT_TYPE = "content_type"  # 200, but not text/event-stream
    REFUSED = "refused"  # nothing listens at host:port
    DNS = "dns"  # the host name does not resolve
    TLS = "tls"  # handshake or certificate verification failed
    TIMEOUT = "timeout"  # TCP + TLS took longer than connect_timeout
    IDLE_TIMEOUT = "idle_timeout"  # a stream with no byte for idle_timeout
    CLOSED = "closed"  # the connection ended or was reset (also a clean end of stream)
    PROTOCOL = "protocol"  # the app broke HTTP/1.1
    NETWORK = "network"  # another socket error: host or network unreachable...
    INTERNAL = "internal"  # a bug in ssefan (logged with its traceback)


@dataclasses.dataclass(frozen=True, slots=True)
class LastFailure:
    """How the upstream's most recent attempt ended. Kept after recovery
    (with `count` 0) so the status page can still say what happened last."""

    kind: FailureKind
    text: str  # one sentence: what was wrong, and what to check
    url: str  # the upstream URL, credentials redacted
    count: int  # attempts failed in a row; 0 once a later attempt streams
    at: float  # time.time() of the failure
    # When the next attempt is due, set on entering backoff: time.monotonic()
    # (for "in 0.4s") and time.time() (for a clock time people can compare).
    next_attempt: float | None = None
    next_attempt_wall: float | None = None

    def describe(self, state: UpstreamState, now: float | None = None) -> str:
        """`state` with this failure, in one line without ';' (/readyz joins
        reasons with it): kind, count, text, URL and the next attempt."""
        in_a_row = "1 failure" if self.count == 1 else f"{self.count} failures in a row"
        line = f"{state.value} ({self.kind.value}, {in_a_row}): {self.text}, url {self.url}"
        if state is UpstreamState.BACKOFF and self.next_attempt is not None:
            wait = max(0.0, self.next_attempt - (time.monotonic() if now is None else now))
            line += f", next attempt in {wait:.2f}s"
            if self.next_attempt_wall is not None:
                line += f" (at {_clock(self.next_attempt_wall)})"
        elif state is UpstreamState.CONNECTING:
            line += f", attempt {self.count + 1} under way"
        return line


def _clock(wall: float) -> str:
    stamp = datetime.datetime.fromtimestamp(wall, tz=datetime.UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UpstreamFailure(Exception):
    """The app answered, but not with a usable event stream (remote side's fault)."""

    def __init__(self, kind: FailureKind, text: str) -> None:
        super().__init__(text)
        self.kind = kind


# What ends an attempt through the app's or the network's fault, each of which
# `classify` has a sentence for; anything else is a bug of ours.
ATTEMPT_FAILURES = (OSError, TimeoutError, h11.ProtocolError, OriginProtocolError, UpstreamFailure)


def classify(exc: BaseException, origin: Origin) -> tuple[FailureKind, str]:
    """The kind and a sentence for an exception that ended an attempt."""
    where = f"{origin.host}:{origin.port}"
    if isinstance(exc, UpstreamFailure):
        return exc.kind, str(exc)
    if isinstance(exc, OriginClosed) and exc.__cause__ is not None:
        exc = exc.__cause__  # the socket's own error says more (a reset, TLS)
    # Before OSError: ssl.SSLError and socket.gaierror are OSErrors too.
    if isinstance(exc, ssl.SSLCertVerificationError):
        # verify_message is set by OpenSSL's handshake, not by the constructor.
        why = getattr(exc, "verify_message", None) or exc
        return FailureKind.TLS, f"TLS certificate of {where} not accepted: {why}"
    if isinstance(exc, ssl.SSLError):
        return FailureKind.TLS, (
            f"TLS handshake with {where} failed ({getattr(exc, 'reason', None) or exc}):"
            " does it speak TLS on that port (https://)?"
        )
    if isinstance(exc, ConnectionRefusedError):
        return FailureKind.REFUSED, (
            f"connection refused by {where} ({type(exc).__name__}):"
            " is the app running and listening there?"
        )
    if isinstance(exc, socket.gaierror):
        return FailureKind.DNS, f"host {origin.host!r} does not resolve ({exc.strerror})"
    if isinstance(exc, ConnectionError):
        return FailureKind.CLOSED, f"connection to {where} lost ({describe_exception(exc)})"
    if isinstance(exc, TimeoutError):
        return FailureKind.TIMEOUT, f"timed out talking to {where} ({describe_exception(exc)})"
    if isinstance(exc, h11.ProtocolError | OriginProtocolError):
        return FailureKind.PROTOCOL, f"the app's HTTP/1.1 response is malformed: {exc}"
    return FailureKind.NETWORK, f"network error with {where} ({describe_exception(exc)})"
