"""YAML configuration -> frozen, typed values, validated with key-path errors.

One concern per module: `schema` (the dataclasses), `values` and `net` (the
value grammars), `syntax` (YAML text and its errors), `reader` (key paths,
lines, unknown keys), `keys`, `sections` and `route` (the section readers),
`loader` (the entry points), `tls` (the TLS context the listener serves,
built and checked from the files). This names what the rest of ssefan imports.
"""

from ssefan.config.loader import ConfigError, load_config, parse_config
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
    StartConfig,
    TLSConfig,
    UpstreamConfig,
)
from ssefan.config.tls import TLSProblem, server_context
from ssefan.config.values import parse_duration, parse_size

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "CorsConfig",
    "Http2Config",
    "KeyConfig",
    "ListenConfig",
    "ProxyConfig",
    "RouteConfig",
    "StartConfig",
    "TLSConfig",
    "TLSProblem",
    "UpstreamConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "server_context",
]
