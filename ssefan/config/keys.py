"""The keys each section allows, and where a key written in the wrong section belongs."""

from __future__ import annotations

_CONFIG_KEYS = (
    "listen",
    "app",
    "routes",
    "max_clients",
    "max_header_bytes",
    "header_timeout",
    "keepalive_timeout",
    "proxy",
    "trusted_proxies",
    "admin",
    "workers",
    "drain_window",
    "shutdown_timeout",
    "ready_timeout",
)
_ROUTE_KEYS = (
    "path",
    "upstream",
    "buffer",
    "buffer_bytes",
    "buffer_age",
    "heartbeat",
    "heartbeat_event",
    "retry",
    "mode",
    "linger",
    "start",
    "on_gap",
    "max_clients",
    "max_client_lag_bytes",
    "cors",
    "auth",
    "refuse",
    "protect_variants",
)
_UPSTREAM_KEYS = (
    "url",
    "headers",
    "connect_timeout",
    "idle_timeout",
    "backoff_base",
    "backoff_max",
    "backoff_reset",
    "max_line_bytes",
    "max_event_bytes",
)
_CORS_KEYS = ("allow_origins", "allow_credentials", "max_age")
_START_KEYS = ("events", "age")
_AUTH_KEYS = (
    "url",
    "forward",
    "cache",
    "timeout",
    "token_param",
    "token_header",
    "token_scheme",
    "revalidate",
)
_PROXY_KEYS = (
    "connect_timeout",
    "first_byte_timeout",
    "idle_timeout",
    "max_body_bytes",
    "pool_size",
    "pool_idle_timeout",
)
_ADMIN_KEYS = ("listen",)


def _misplaced(keys: tuple[str, ...], where: str, allowed: tuple[str, ...]) -> dict[str, str]:
    return {key: f'"{key}" belongs {where}' for key in keys if key not in allowed}


_MISPLACED_AT_TOP = {
    **_misplaced(_AUTH_KEYS, "under a route's auth", _CONFIG_KEYS),
    **_misplaced(_CORS_KEYS, "under a route's cors", _CONFIG_KEYS),
    **_misplaced(_UPSTREAM_KEYS, "under a route's upstream", _CONFIG_KEYS),
    **_misplaced(_PROXY_KEYS, "under proxy", _CONFIG_KEYS),
    **_misplaced(
        tuple(set(_PROXY_KEYS) & set(_UPSTREAM_KEYS)),
        "under proxy (requests passed to app) or a route's upstream (its stream)",
        _CONFIG_KEYS,
    ),
    **_misplaced(_ROUTE_KEYS, "to a route: put it under each entry of routes", _CONFIG_KEYS),
}
_MISPLACED_IN_ROUTE = {
    **_misplaced(_AUTH_KEYS, "under auth", _ROUTE_KEYS),
    **_misplaced(_CORS_KEYS, "under cors", _ROUTE_KEYS),
    **_misplaced(_PROXY_KEYS, "under the top-level proxy", _ROUTE_KEYS),
    **_misplaced(_UPSTREAM_KEYS, "under upstream (use its mapping form with url)", _ROUTE_KEYS),
}
