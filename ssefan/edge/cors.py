"""CORS decisions for stream routes (Fetch standard, "CORS protocol").

Pure functions over header values: the server asks, these answer with the
headers to add, or None when the origin is not allowed.
"""

from __future__ import annotations

from ssefan.config import CorsConfig

__all__ = ["ALLOWED_METHODS", "ALLOWED_REQUEST_HEADERS", "preflight_headers", "response_headers"]

Headers = list[tuple[bytes, bytes]]

ALLOWED_METHODS = b"GET, HEAD, OPTIONS"
# What an EventSource (or a fetch-based SSE client) may send: Last-Event-ID on
# reconnect, Cache-Control (Fetch adds it for no-store), Authorization for SDKs.
ALLOWED_REQUEST_HEADERS = (b"last-event-id", b"cache-control", b"authorization")


def origin_allowed(cors: CorsConfig, origin: bytes) -> bool:
    return "*" in cors.allow_origins or origin.decode("latin-1") in cors.allow_origins


def response_headers(cors: CorsConfig | None, origin: bytes | None) -> Headers | None:
    """Headers for an actual (non-preflight) response; None = origin refused.

    No `cors` on the route: no CORS headers at all (same-origin deployments).
    No Origin header: not a cross-origin browser request, nothing to add.
    """
    if cors is None or origin is None:
        return []
    if not origin_allowed(cors, origin):
        return None
    if "*" in cors.allow_origins and not cors.allow_credentials:
        return [(b"access-control-allow-origin", b"*")]
    # Echoing the origin makes the response differ per origin: caches must key on it.
    headers: Headers = [(b"access-control-allow-origin", origin), (b"vary", b"Origin")]
    if cors.allow_credentials:
        headers.append((b"access-control-allow-credentials", b"true"))
    return headers


def preflight_headers(cors: CorsConfig, origin: bytes) -> Headers | None:
    """Headers for a 204 answer to an OPTIONS preflight; None = origin refused."""
    headers = response_headers(cors, origin)
    if headers is None:
        return None
    if not any(name == b"vary" for name, _ in headers):
        headers.append((b"vary", b"Origin"))
    headers += [
        (b"access-control-allow-methods", ALLOWED_METHODS),
        (b"access-control-allow-headers", b", ".join(ALLOWED_REQUEST_HEADERS)),
        (b"access-control-max-age", str(int(cors.max_age)).encode("ascii")),
    ]
    return headers
