"""The keys each section allows, and where a key written in the wrong section belongs.

A section's keys are its dataclass's fields, in their order (which is the order
"expected one of: ..." lists them in), so a new setting is declared once as a
field; only `start`, whose YAML form differs from its fields, lists its own.
"""

from __future__ import annotations

import dataclasses

from ssefan.config.schema import (
    AdminConfig,
    AuthConfig,
    Config,
    CorsConfig,
    Http2Config,
    KeyConfig,
    ListenConfig,
    ProxyConfig,
    RouteConfig,
    TLSConfig,
    UpstreamConfig,
)


def _fields(cls: type, *, without: tuple[str, ...] = ()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in without)


# `source` is set from the file's name, not written in it.
_CONFIG_KEYS = _fields(Config, without=("source",))
_ROUTE_KEYS = _fields(RouteConfig)
_UPSTREAM_KEYS = _fields(UpstreamConfig)
_CORS_KEYS = _fields(CorsConfig)
_KEY_KEYS = _fields(KeyConfig)
# `start: {events: N}` or `{age: DURATION}`; StartConfig's fields are kind, count, age.
_START_KEYS = ("events", "age")
_AUTH_KEYS = _fields(AuthConfig)
_PROXY_KEYS = _fields(ProxyConfig)
_ADMIN_KEYS = _fields(AdminConfig)
# `listen: {address: "HOST:PORT", tls: {...}}`: host and port are written
# together as `address`, as in the string form.
_LISTEN_KEYS = ("address", *_fields(ListenConfig, without=("host", "port")))
_TLS_KEYS = _fields(TLSConfig)
_HTTP2_KEYS = _fields(Http2Config)


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
