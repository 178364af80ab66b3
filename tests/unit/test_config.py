"""YAML -> Config: every key, every unit, and the exact messages people read."""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from ssefan.config import (
    AdminConfig,
    AuthConfig,
    Config,
    ConfigError,
    CorsConfig,
    ListenConfig,
    ProxyConfig,
    RouteConfig,
    StartConfig,
    UpstreamConfig,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config.example.yaml"
DOCS = ROOT / "docs" / "configuration.md"

MINIMAL = """\
listen: 127.0.0.1:8080
routes:
  - path: /events
    upstream: http://127.0.0.1:8000/events
"""


def with_route_keys(lines: str) -> str:
    """MINIMAL with extra keys in its one route (given unindented)."""
    return MINIMAL + textwrap.indent(textwrap.dedent(lines), "    ")


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "config.yaml")
    return caught.value.problems


# --- units ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("15s", 15.0, id="seconds"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("2m", 120.0, id="minutes"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("1.5s", 1.5, id="decimal"),
        pytest.param("10 s", 10.0, id="space-before-unit"),
        pytest.param("0s", 0.0, id="zero-string"),
        pytest.param(0, 0.0, id="zero"),
        pytest.param(30, 30.0, id="plain-int-is-seconds"),
        pytest.param(2.5, 2.5, id="plain-float-is-seconds"),
    ],
)
def test_duration_parses(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


DURATION_EXPECTED = 'a duration like "15s", "500ms", "2m" or "1h" (a plain number means seconds)'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("fast", f'expected {DURATION_EXPECTED}, got "fast"', id="word"),
        pytest.param("15", f'expected {DURATION_EXPECTED}, got "15"', id="quoted-number"),
        pytest.param("15sec", f'expected {DURATION_EXPECTED}, got "15sec"', id="long-unit"),
        pytest.param("15S", f'expected {DURATION_EXPECTED}, got "15S"', id="uppercase-unit"),
        pytest.param("1m30s", f'expected {DURATION_EXPECTED}, got "1m30s"', id="compound"),
        pytest.param(True, f"expected {DURATION_EXPECTED}, got true", id="boolean"),
        pytest.param(None, f"expected {DURATION_EXPECTED}, got null", id="null"),
        pytest.param([1], f"expected {DURATION_EXPECTED}, got a list", id="list"),
        pytest.param(-1, "expected a duration of 0 or more, got -1", id="negative"),
        pytest.param("-5s", 'expected a duration of 0 or more, got "-5s"', id="negative-string"),
        pytest.param(float("inf"), "expected a duration of 0 or more, got inf", id="infinite"),
    ],
)
def test_duration_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"^") as caught:
        parse_duration(value)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("value", "size"),
    [
        pytest.param("512B", 512, id="bytes"),
        pytest.param("64KiB", 64 * 1024, id="kibibytes"),
        pytest.param("8MiB", 8 * 1024**2, id="mebibytes"),
        pytest.param("1GiB", 1024**3, id="gibibytes"),
        pytest.param("10kB", 10_000, id="kilobytes"),
        pytest.param("10KB", 10_000, id="kilobytes-uppercase-k"),
        pytest.param("3MB", 3_000_000, id="megabytes"),
        pytest.param("1GB", 1_000_000_000, id="gigabytes"),
        pytest.param("1.5KiB", 1536, id="decimal-to-whole-bytes"),
        pytest.param("2 MiB", 2 * 1024**2, id="space-before-unit"),
        pytest.param(4096, 4096, id="plain-int-is-bytes"),
        pytest.param(0, 0, id="zero"),
    ],
)
def test_size_parses(value: object, size: int) -> None:
    assert parse_size(value) == size


SIZE_EXPECTED = 'a size like "64KiB", "8MiB", "1GiB" or a number of bytes'


@pytest.mark.parametrize(
    ("value", "message"),
    [
        pytest.param("big", f'expected {SIZE_EXPECTED}, got "big"', id="word"),
        pytest.param(
            "8M", f'expected {SIZE_EXPECTED}, got "8M"; did you mean "8MiB"?', id="bare-M"
        ),
        pytest.param("8mb", f'expected {SIZE_EXPECTED}, got "8mb"; did you mean "8MB"?', id="mb"),
        pytest.param(
            "8 parsecs",
            f'expected {SIZE_EXPECTED}, got "8 parsecs"; units: B, KiB, MiB, GiB, kB, KB, MB, GB',
            id="unknown-unit",
        ),
        pytest.param("0.5B", 'expected a whole number of bytes, got "0.5B"', id="fractional"),
        pytest.param(1024.0, f"expected {SIZE_EXPECTED}, got 1024.0", id="float"),
        pytest.param(False, f"expected {SIZE_EXPECTED}, got false", id="boolean"),
        pytest.param(-1, "expected a size of 0 or more, got -1", id="negative"),
        pytest.param("-1KiB", 'expected a size of 0 or more, got "-1KiB"', id="negative-string"),
    ],
)
def test_size_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=r"^") as caught:
        parse_size(value)
    assert str(caught.value) == message


# --- good configs ----------------------------------------------------------------


def test_minimal_config_takes_every_default() -> None:
    config = parse_config(MINIMAL, "config.yaml")
    assert config == Config(
        listen=ListenConfig(host="127.0.0.1", port=8080),
        routes=(
            RouteConfig(
                path="/events", upstream=UpstreamConfig(url="http://127.0.0.1:8000/events")
            ),
        ),
        source="config.yaml",
    )


def test_every_key_is_read() -> None:
    # Every key set to a non-default value: a key the loader forgot would keep
    # its default and this comparison would fail.
    text = """\
        listen: "[::1]:9090"
        app: http://127.0.0.1:8000/
        max_clients: 500
        max_header_bytes: 8KiB
        header_timeout: 3s
        keepalive_timeout: 0
        proxy:
          connect_timeout: 1s
          first_byte_timeout: 2m
          idle_timeout: 5m
          max_body_bytes: 1MiB
          pool_size: 0
          pool_idle_timeout: 10s
        trusted_proxies: ["10.1.2.3/8", "::1", 192.168.0.7]
        admin: {listen: 127.0.0.1:9091}
        workers: 4
        drain_window: 0
        shutdown_timeout: 1m
        ready_timeout: 3s
        routes:
          - path: /orders
            upstream:
              url: https://orders.internal:8443/stream?tenant=acme
              headers: {Authorization: "Bearer s3cret", X-Tenant: "42"}
              connect_timeout: 2s
              idle_timeout: 90s
              backoff_base: 500ms
              backoff_max: 1m
              backoff_reset: 5m
              max_line_bytes: 64KiB
              max_event_bytes: 256KiB
            buffer: 50
            buffer_bytes: 1MiB
            buffer_age: 0
            heartbeat: 20s
            heartbeat_event: ping
            retry: 2.5s
            mode: lazy
            linger: 10s
            start: {events: 10}
            on_gap: live
            max_clients: 20
            max_client_lag_bytes: 256KiB
            cors:
              allow_origins: ["https://a.example.com", "http://localhost:3000"]
              allow_credentials: true
              max_age: 1m
            auth:
              url: https://auth.internal/check?scope=orders
              forward: [Cookie, X-Session]
              cache: 0
              timeout: 2s
              token_param: access_token
              token_header: X-Token
              token_scheme: ""
              revalidate: 5m
    """
    expected = Config(
        listen=ListenConfig(host="::1", port=9090),
        app="http://127.0.0.1:8000",
        routes=(
            RouteConfig(
                path="/orders",
                upstream=UpstreamConfig(
                    url="https://orders.internal:8443/stream?tenant=acme",
                    headers=(("Authorization", "Bearer s3cret"), ("X-Tenant", "42")),
                    connect_timeout=2.0,
                    idle_timeout=90.0,
                    backoff_base=0.5,
                    backoff_max=60.0,
                    backoff_reset=300.0,
                    max_line_bytes=64 * 1024,
                    max_event_bytes=256 * 1024,
                ),
                buffer=50,
                buffer_bytes=1024**2,
                buffer_age=0.0,
                heartbeat=20.0,
                heartbeat_event="ping",
                retry=2500,
                mode="lazy",
                linger=10.0,
                start=StartConfig(kind="events", count=10),
                on_gap="live",
                max_clients=20,
                max_client_lag_bytes=256 * 1024,
                cors=CorsConfig(
                    allow_origins=("https://a.example.com", "http://localhost:3000"),
                    allow_credentials=True,
                    max_age=60.0,
                ),
                auth=AuthConfig(
                    url="https://auth.internal/check?scope=orders",
                    forward=("cookie", "x-session"),
                    cache=0.0,
                    timeout=2.0,
                    token_param="access_token",
                    token_header="x-token",
                    token_scheme="",
                    revalidate=300.0,
                ),
            ),
        ),
        max_clients=500,
        max_header_bytes=8 * 1024,
        header_timeout=3.0,
        keepalive_timeout=0.0,
        proxy=ProxyConfig(
            connect_timeout=1.0,
            first_byte_timeout=120.0,
            idle_timeout=300.0,
            max_body_bytes=1024**2,
            pool_size=0,
            pool_idle_timeout=10.0,
        ),
        trusted_proxies=("10.0.0.0/8", "::1/128", "192.168.0.7/32"),
        admin=AdminConfig(listen=ListenConfig(host="127.0.0.1", port=9091)),
        workers=4,
        drain_window=0.0,
        shutdown_timeout=60.0,
        ready_timeout=3.0,
        source="full.yaml",
    )
    assert parse_config(textwrap.dedent(text), "full.yaml") == expected


def _route(config: Config) -> RouteConfig:
    return config.routes[0]


def _cors(config: Config) -> CorsConfig:
    cors = _route(config).cors
    assert cors is not None
    return cors


def _auth(config: Config) -> AuthConfig:
    auth = _route(config).auth
    assert auth is not None
    return auth


@pytest.mark.parametrize(
    ("text", "pick", "expected"),
    [
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:0"),
            lambda c: c.listen,
            ListenConfig(host="0.0.0.0", port=0),
            id="listen-any-port-0",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", "localhost:65535"),
            lambda c: c.listen,
            ListenConfig(host="localhost", port=65535),
            id="listen-hostname",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", '"[::]:8080"'),
            lambda c: c.listen,
            ListenConfig(host="::", port=8080),
            id="listen-ipv6-any",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\napp: https://app.internal\n",
            lambda c: (c.app, c.routes),
            ("https://app.internal", ()),
            id="no-routes-with-app",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\napp: http://127.0.0.1:8000\nroutes: []\n",
            lambda c: c.routes,
            (),
            id="empty-routes-with-app",
        ),
        pytest.param(
            with_route_keys("start: live"),
            lambda c: _route(c).start,
            StartConfig(kind="live"),
            id="start-live",
        ),
        pytest.param(
            with_route_keys("start: {age: 30s}"),
            lambda c: _route(c).start,
            StartConfig(kind="age", age=30.0),
            id="start-age",
        ),
        pytest.param(
            with_route_keys("start: {events: 1000}"),
            lambda c: _route(c).start,
            StartConfig(kind="events", count=1000),
            id="start-events-equal-to-buffer",
        ),
        pytest.param(
            with_route_keys("start: {age: 2h}\nbuffer_age: 0"),
            lambda c: _route(c).start,
            StartConfig(kind="age", age=7200.0),
            id="start-age-without-age-bound",
        ),
        pytest.param(
            with_route_keys("retry: 3000ms"),
            lambda c: _route(c).retry,
            3000,
            id="retry-milliseconds",
        ),
        pytest.param(
            with_route_keys("retry: 1.5s"),
            lambda c: _route(c).retry,
            1500,
            id="retry-seconds",
        ),
        pytest.param(
            with_route_keys("retry: null\nheartbeat_event: null\nmax_clients: null\ncors: null"),
            lambda c: (
                _route(c).retry,
                _route(c).heartbeat_event,
                _route(c).max_clients,
                _route(c).cors,
            ),
            (None, None, None, None),
            id="explicit-nulls",
        ),
        pytest.param(
            with_route_keys('cors: {allow_origins: ["*"]}'),
            lambda c: _route(c).cors,
            CorsConfig(allow_origins=("*",)),
            id="cors-wildcard",
        ),
        pytest.param(
            with_route_keys(
                "cors:\n  allow_origins:\n"
                "    - HTTPS://App.Example.com:443\n"
                "    - http://localhost:80\n"
                "    - http://[::1]:3000\n"
                "    - chrome-extension://abcdef\n"
            ),
            lambda c: _cors(c).allow_origins,
            (
                "https://app.example.com",
                "http://localhost",
                "http://[::1]:3000",
                "chrome-extension://abcdef",
            ),
            id="origins-normalised-as-browsers-send-them",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: [https://a.example], allow_credentials: yes}"),
            lambda c: _cors(c).allow_credentials,
            True,
            id="yaml-1.1-yes-is-a-boolean",
        ),
        pytest.param(
            MINIMAL.replace(
                "upstream: http://127.0.0.1:8000/events",
                "upstream: {url: 'http://[::1]:8000/events?x=1'}",
            ),
            lambda c: _route(c).upstream,
            UpstreamConfig(url="http://[::1]:8000/events?x=1"),
            id="upstream-mapping-with-only-url",
        ),
        pytest.param(
            "\ufeff" + MINIMAL,
            lambda c: c.listen.port,
            8080,
            id="byte-order-mark",
        ),
        pytest.param(
            MINIMAL.replace("/events\n", "/events/\n", 1),
            lambda c: _route(c).path,
            "/events/",
            id="path-trailing-slash-kept",
        ),
        pytest.param(
            with_route_keys("buffer_age: 1:30"),
            lambda c: _route(c).buffer_age,
            90.0,
            id="yaml-1.1-sexagesimal-is-seconds",
        ),
        # auth
        pytest.param(
            with_route_keys("auth: {url: 'http://127.0.0.1:8000/auth'}"),
            lambda c: _route(c).auth,
            AuthConfig(url="http://127.0.0.1:8000/auth"),
            id="auth-url-only-takes-defaults",
        ),
        pytest.param(
            with_route_keys("auth: {url: 'http://[::1]:8000/auth', forward: [], token_param: t}"),
            lambda c: (_auth(c).forward, _auth(c).token_param),
            ((), "t"),
            id="auth-forward-nothing-token-only",
        ),
        pytest.param(
            with_route_keys(
                "auth: {url: 'http://a/auth', forward: null, token_param: null, revalidate: null}"
            ),
            lambda c: _route(c).auth,
            AuthConfig(url="http://a/auth"),
            id="auth-explicit-nulls",
        ),
        pytest.param(
            with_route_keys("auth: {url: 'http://a/auth', token_scheme: Token, token_header: X-A}"),
            lambda c: (_auth(c).token_scheme, _auth(c).token_header),
            ("Token", "x-a"),
            id="auth-token-scheme-and-header",
        ),
        pytest.param(
            with_route_keys("auth: null"),
            lambda c: _route(c).auth,
            None,
            id="auth-null",
        ),
        # proxy
        pytest.param(
            MINIMAL + "proxy: {max_body_bytes: 1GB, pool_size: 0}\n",
            lambda c: c.proxy,
            ProxyConfig(max_body_bytes=10**9, pool_size=0),
            id="proxy-partial",
        ),
        pytest.param(
            MINIMAL + "proxy: null\n",
            lambda c: c.proxy,
            ProxyConfig(),
            id="proxy-null",
        ),
        # trusted_proxies
        pytest.param(
            MINIMAL
            + "trusted_proxies: [127.0.0.1, '2001:DB8::/32', 172.16.5.4/12, '::ffff:1.2.3.4']\n",
            lambda c: c.trusted_proxies,
            ("127.0.0.1/32", "2001:db8::/32", "172.16.0.0/12", "::ffff:102:304/128"),
            id="trusted-proxies-normalised",
        ),
        pytest.param(
            MINIMAL + "trusted_proxies: []\n",
            lambda c: c.trusted_proxies,
            (),
            id="trusted-proxies-empty",
        ),
        # admin
        pytest.param(
            MINIMAL + "admin: {listen: '[::1]:9090'}\n",
            lambda c: c.admin,
            AdminConfig(listen=ListenConfig(host="::1", port=9090)),
            id="admin-ipv6",
        ),
        pytest.param(
            MINIMAL + "admin: {listen: 127.0.0.2:8080}\n",
            lambda c: c.admin,
            AdminConfig(listen=ListenConfig(host="127.0.0.2", port=8080)),
            id="admin-same-port-other-address",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:0") + "admin: {listen: 127.0.0.1:0}\n",
            lambda c: c.admin,
            AdminConfig(listen=ListenConfig(host="127.0.0.1", port=0)),
            id="admin-both-port-0",
        ),
        pytest.param(
            MINIMAL + "admin: null\n",
            lambda c: c.admin,
            None,
            id="admin-null",
        ),
        # workers and lifecycle
        pytest.param(
            MINIMAL + "workers: auto\n",
            lambda c: c.workers,
            os.cpu_count() or 1,
            id="workers-auto",
        ),
        pytest.param(
            MINIMAL + "drain_window: 0\nshutdown_timeout: 500ms\nready_timeout: 1m\n",
            lambda c: (c.drain_window, c.shutdown_timeout, c.ready_timeout),
            (0.0, 0.5, 60.0),
            id="lifecycle-durations",
        ),
    ],
)
def test_good_config(text: str, pick: Callable[[Config], object], expected: object) -> None:
    assert pick(parse_config(text, "config.yaml")) == expected


def test_source_is_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "ssefan.yaml"
    path.write_text(MINIMAL)
    assert load_config(path).source == str(path)
    assert load_config(str(path)).source == str(path)


def test_parse_config_source_defaults_to_string() -> None:
    assert parse_config(MINIMAL).source == "<string>"


# --- bad configs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # top level
        pytest.param(
            "",
            ["config.yaml: the file is empty; expected a mapping with at least listen and routes"],
            id="empty-file",
        ),
        pytest.param(
            "- listen: 127.0.0.1:8080\n",
            [
                "config.yaml:1: expected a mapping of settings (listen, app, routes, ...),"
                " got a list"
            ],
            id="top-level-list",
        ),
        pytest.param(
            "routes: []\napp: http://x\n",
            [
                "config.yaml:1: listen: missing; expected the address to serve on,"
                ' like "127.0.0.1:8080"'
            ],
            id="listen-missing",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\n",
            [
                "config.yaml:1: routes: no routes and no app: add at least one route,"
                " or set app to only pass requests through"
            ],
            id="nothing-to-serve",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: {path: /events}\n",
            ["config.yaml:2: routes: expected a list of routes (- path: ...), got a mapping"],
            id="routes-not-a-list",
        ),
        pytest.param(
            MINIMAL + "listen_port: 80\n",
            ['config.yaml:5: listen_port: unknown key; did you mean "listen"?'],
            id="top-did-you-mean",
        ),
        pytest.param(
            MINIMAL + "zzz: 1\n",
            [
                "config.yaml:5: zzz: unknown key; expected one of: listen, app, routes,"
                " max_clients, max_channels, ring_bytes_total, max_header_bytes, header_timeout,"
                " keepalive_timeout, proxy, trusted_proxies, admin, workers, drain_window,"
                " shutdown_timeout, ready_timeout, state_dir, state_sync"
            ],
            id="top-unknown-no-suggestion",
        ),
        pytest.param(
            MINIMAL + "heartbeat: 5s\n",
            [
                'config.yaml:5: heartbeat: unknown key here; "heartbeat" belongs to a route:'
                " put it under each entry of routes"
            ],
            id="route-key-at-top",
        ),
        pytest.param(
            MINIMAL + "allow_origins: ['*']\n",
            [
                'config.yaml:5: allow_origins: unknown key here; "allow_origins" belongs'
                " under a route's cors"
            ],
            id="cors-key-at-top",
        ),
        pytest.param(
            MINIMAL + "max_clients: 0\n",
            ["config.yaml:5: max_clients: expected an integer >= 1, got 0"],
            id="max-clients-zero",
        ),
        pytest.param(
            MINIMAL + "max_header_bytes: 0\n",
            ["config.yaml:5: max_header_bytes: expected a size greater than 0, got 0"],
            id="max-header-bytes-zero",
        ),
        pytest.param(
            MINIMAL + "header_timeout: 0s\n",
            ['config.yaml:5: header_timeout: expected a duration greater than 0, got "0s"'],
            id="header-timeout-zero",
        ),
        # listen
        *[
            pytest.param(
                MINIMAL.replace("127.0.0.1:8080", listen),
                [f"config.yaml:1: listen: {message}"],
                id=case_id,
            )
            for listen, message, case_id in [
                (
                    ":8080",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got ":8080";'
                    ' write "127.0.0.1:8080" (this host only) or "0.0.0.0:8080" (every interface)',
                    "listen-no-host",
                ),
                (
                    "8080",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got 8080;'
                    ' write "127.0.0.1:8080" (this host only) or "0.0.0.0:8080" (every interface)',
                    "listen-bare-port",
                ),
                (
                    "localhost",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got "localhost"',
                    "listen-no-port",
                ),
                (
                    "127.0.0.1:65536",
                    'expected a port from 0 to 65535, got "127.0.0.1:65536"',
                    "listen-port-too-big",
                ),
                (
                    "127.0.0.1:http",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080",'
                    ' got "127.0.0.1:http"',
                    "listen-port-name",
                ),
                (
                    "'::1:8080'",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080", got "::1:8080";'
                    " put IPv6 addresses in brackets",
                    "listen-ipv6-without-brackets",
                ),
                (
                    "'[127.0.0.1]:80'",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080",'
                    ' got "[127.0.0.1]:80"; "127.0.0.1" is not a valid host',
                    "listen-ipv4-in-brackets",
                ),
                (
                    "999.0.0.1:80",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080",'
                    ' got "999.0.0.1:80"; "999.0.0.1" is not a valid host',
                    "listen-bad-ipv4",
                ),
                (
                    "my_host:80",
                    'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080",'
                    ' got "my_host:80"; "my_host" is not a valid host',
                    "listen-bad-hostname",
                ),
            ]
        ],
        # app
        *[
            pytest.param(
                f"listen: 127.0.0.1:8080\napp: {app}\n",
                [f"config.yaml:2: app: {message}"],
                id=case_id,
            )
            for app, message, case_id in [
                (
                    "127.0.0.1:8000",
                    'expected an http:// or https:// URL like "http://127.0.0.1:8000",'
                    ' got "127.0.0.1:8000"',
                    "app-no-scheme",
                ),
                (
                    "ftp://files",
                    'expected an http:// or https:// URL like "http://127.0.0.1:8000",'
                    ' got "ftp://files"',
                    "app-ftp",
                ),
                (
                    "http://",
                    'expected an http:// or https:// URL like "http://127.0.0.1:8000",'
                    ' got "http://"',
                    "app-no-host",
                ),
                (
                    "http://127.0.0.1:8000/api",
                    'expected only scheme://host:port, like "http://127.0.0.1:8000",'
                    ' got "http://127.0.0.1:8000/api": each request keeps its own path and query',
                    "app-path",
                ),
                (
                    "http://127.0.0.1:8000?x=1",
                    'expected only scheme://host:port, like "http://127.0.0.1:8000",'
                    ' got "http://127.0.0.1:8000?x=1": each request keeps its own path and query',
                    "app-query",
                ),
                (
                    "'http://127.0.0.1:8000#top'",
                    "expected a URL without #fragment (it is never sent),"
                    ' got "http://127.0.0.1:8000#top"',
                    "app-fragment",
                ),
                (
                    "http://127.0.0.1:0",
                    'expected a port from 1 to 65535 in the URL, got "http://127.0.0.1:0"',
                    "app-port-zero",
                ),
                (
                    "http://127.0.0.1:99999",
                    'expected a port from 1 to 65535 in the URL, got "http://127.0.0.1:99999"',
                    "app-port-too-big",
                ),
                (
                    "http://admin:hunter2@127.0.0.1:8000",
                    "the URL must not contain user:password@ (URLs are logged);"
                    " send credentials with upstream headers such as Authorization",
                    "app-credentials-not-echoed",
                ),
            ]
        ],
        # routes and their keys
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: [/events]\n",
            [
                "config.yaml:2: routes[0]: expected a mapping with at least path and upstream,"
                ' got "/events"'
            ],
            id="route-not-a-mapping",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - {buffer: 5}\n",
            [
                "config.yaml:3: routes[0].path: missing; expected the path clients request,"
                ' like "/events"',
                "config.yaml:3: routes[0].upstream: missing; expected the URL of the app's stream,"
                ' like "http://127.0.0.1:8000/events"',
            ],
            id="route-required-keys",
        ),
        pytest.param(
            MINIMAL.replace("path: /events", "path: events"),
            [
                'config.yaml:3: routes[0].path: expected a path starting with "/", like "/events",'
                ' got "events"'
            ],
            id="path-relative",
        ),
        pytest.param(
            MINIMAL.replace("path: /events", "path: /events?topic=a"),
            [
                'config.yaml:3: routes[0].path: expected a path starting with "/", like "/events"'
                ' without ? or #, got "/events?topic=a": routes match on the path alone'
                " (clients add their own query, e.g. last_event_id)"
            ],
            id="path-query",
        ),
        pytest.param(
            MINIMAL.replace("path: /events", "path: '/my events'"),
            [
                'config.yaml:3: routes[0].path: expected a path starting with "/", like "/events",'
                ' got "/my events"'
            ],
            id="path-space",
        ),
        pytest.param(
            MINIMAL + "  - path: /events\n    upstream: http://127.0.0.1:8000/other\n",
            [
                'config.yaml:5: routes[1].path: "/events" is already the path of routes[0];'
                " each path serves one stream"
            ],
            id="duplicate-path",
        ),
        pytest.param(
            MINIMAL + "  - path: /events/\n    upstream: http://127.0.0.1:8000/other\n",
            [
                'config.yaml:5: routes[1].path: "/events/" is the same route as routes[0].path'
                ' "/events" (requests are matched after normalising "/", "//", "." and'
                " percent-escapes); each path serves one stream"
            ],
            id="same-route-after-normalising",
        ),
        pytest.param(
            with_route_keys("hearbeat: 5s"),
            ['config.yaml:5: routes[0].hearbeat: unknown key; did you mean "heartbeat"?'],
            id="route-did-you-mean",
        ),
        pytest.param(
            with_route_keys("headers: {Authorization: x}"),
            [
                'config.yaml:5: routes[0].headers: unknown key here; "headers" belongs under'
                " upstream (use its mapping form with url)"
            ],
            id="upstream-key-in-route",
        ),
        pytest.param(
            with_route_keys("allow_credentials: true"),
            [
                "config.yaml:5: routes[0].allow_credentials: unknown key here;"
                ' "allow_credentials" belongs under cors'
            ],
            id="cors-key-in-route",
        ),
        pytest.param(
            with_route_keys("buffer: abc"),
            ['config.yaml:5: routes[0].buffer: expected an integer >= 1, got "abc"'],
            id="buffer-word",
        ),
        pytest.param(
            with_route_keys("buffer: 0"),
            ["config.yaml:5: routes[0].buffer: expected an integer >= 1, got 0"],
            id="buffer-zero",
        ),
        pytest.param(
            with_route_keys("buffer: 10.5"),
            ["config.yaml:5: routes[0].buffer: expected an integer >= 1, got 10.5"],
            id="buffer-float",
        ),
        pytest.param(
            with_route_keys("buffer: true"),
            ["config.yaml:5: routes[0].buffer: expected an integer >= 1, got true"],
            id="buffer-boolean",
        ),
        pytest.param(
            with_route_keys("buffer_bytes: 0KiB"),
            ['config.yaml:5: routes[0].buffer_bytes: expected a size greater than 0, got "0KiB"'],
            id="buffer-bytes-zero",
        ),
        pytest.param(
            with_route_keys("max_client_lag_bytes: 8M"),
            [
                "config.yaml:5: routes[0].max_client_lag_bytes: expected a size like"
                ' "64KiB", "8MiB", "1GiB" or a number of bytes, got "8M"; did you mean "8MiB"?'
            ],
            id="lag-bytes-unit",
        ),
        pytest.param(
            with_route_keys("heartbeat: fast"),
            [f'config.yaml:5: routes[0].heartbeat: expected {DURATION_EXPECTED}, got "fast"'],
            id="heartbeat-word",
        ),
        pytest.param(
            with_route_keys("heartbeat: 0"),
            ["config.yaml:5: routes[0].heartbeat: expected a duration greater than 0, got 0"],
            id="heartbeat-zero",
        ),
        pytest.param(
            with_route_keys("heartbeat:"),
            [f"config.yaml:5: routes[0].heartbeat: expected {DURATION_EXPECTED}, got null"],
            id="heartbeat-empty",
        ),
        pytest.param(
            with_route_keys("buffer_age: -1"),
            ["config.yaml:5: routes[0].buffer_age: expected a duration of 0 or more, got -1"],
            id="buffer-age-negative",
        ),
        pytest.param(
            with_route_keys("heartbeat_event: ''"),
            [
                'config.yaml:5: routes[0].heartbeat_event: expected an event name like "heartbeat"'
                ' (not empty, no CR or LF), got ""'
            ],
            id="heartbeat-event-empty",
        ),
        pytest.param(
            with_route_keys('heartbeat_event: "ping\\nid: 1"'),
            [
                'config.yaml:5: routes[0].heartbeat_event: expected an event name like "heartbeat"'
                ' (not empty, no CR or LF), got "ping\\nid: 1"'
            ],
            id="heartbeat-event-newline",
        ),
        pytest.param(
            with_route_keys("heartbeat_event: message"),
            [
                'config.yaml:5: routes[0].heartbeat_event: expected a name other than "message",'
                " which EventSource delivers to onmessage with the real events;"
                ' use e.g. "heartbeat"'
            ],
            id="heartbeat-event-message",
        ),
        pytest.param(
            with_route_keys("retry: 3000"),
            [
                'config.yaml:5: routes[0].retry: expected a duration with a unit, like "3s" or'
                ' "3000ms", got 3000: a bare number is ambiguous here'
                " (SSE counts retry in milliseconds)"
            ],
            id="retry-bare-number",
        ),
        pytest.param(
            with_route_keys("retry: soon"),
            [f'config.yaml:5: routes[0].retry: expected {DURATION_EXPECTED}, got "soon"'],
            id="retry-word",
        ),
        pytest.param(
            with_route_keys("mode: lazzy"),
            [
                'config.yaml:5: routes[0].mode: expected "eager" or "lazy", got "lazzy";'
                ' did you mean "lazy"?'
            ],
            id="mode",
        ),
        pytest.param(
            with_route_keys("on_gap: skip"),
            ['config.yaml:5: routes[0].on_gap: expected "replay" or "live", got "skip"'],
            id="on-gap",
        ),
        pytest.param(
            with_route_keys("max_clients: -5"),
            ["config.yaml:5: routes[0].max_clients: expected an integer >= 1, got -5"],
            id="route-max-clients",
        ),
        # start
        pytest.param(
            with_route_keys("start: events"),
            [
                'config.yaml:5: routes[0].start: expected "live", {events: N} or'
                ' {age: DURATION}, got "events"; did you mean {events: N}?'
            ],
            id="start-word",
        ),
        pytest.param(
            with_route_keys("start: {events: 5, age: 1m}"),
            ["config.yaml:5: routes[0].start: expected exactly one of events or age"],
            id="start-both",
        ),
        pytest.param(
            with_route_keys("start: {}"),
            ["config.yaml:5: routes[0].start: expected exactly one of events or age"],
            id="start-empty",
        ),
        pytest.param(
            with_route_keys("start: {evnts: 5}"),
            ['config.yaml:5: routes[0].start.evnts: unknown key; did you mean "events"?'],
            id="start-did-you-mean",
        ),
        pytest.param(
            with_route_keys("start: {events: 0}"),
            ["config.yaml:5: routes[0].start.events: expected an integer >= 1, got 0"],
            id="start-events-zero",
        ),
        pytest.param(
            with_route_keys("buffer: 100\nstart: {events: 101}"),
            [
                "config.yaml:6: routes[0].start.events: expected at most buffer (100) events,"
                " got 101: the ring never holds more; raise buffer or start with fewer"
            ],
            id="start-events-over-buffer",
        ),
        pytest.param(
            with_route_keys("start: {age: 2h}"),
            [
                "config.yaml:5: routes[0].start.age: expected at most buffer_age (1h), got 2h:"
                " older events are already evicted"
            ],
            id="start-age-over-buffer-age",
        ),
        # upstream
        pytest.param(
            MINIMAL.replace("http://127.0.0.1:8000/events", "127.0.0.1:8000/events"),
            [
                "config.yaml:4: routes[0].upstream: expected an http:// or https:// URL like"
                ' "http://127.0.0.1:8000/events", got "127.0.0.1:8000/events"'
            ],
            id="upstream-no-scheme",
        ),
        pytest.param(
            MINIMAL.replace("http://127.0.0.1:8000/events", "[http://a/events]"),
            [
                "config.yaml:4: routes[0].upstream: expected a URL like"
                ' "http://127.0.0.1:8000/events" or a mapping with url (and headers, ...),'
                " got a list"
            ],
            id="upstream-list",
        ),
        pytest.param(
            MINIMAL.replace("http://127.0.0.1:8000/events", "https://bot:pw@app/events"),
            [
                "config.yaml:4: routes[0].upstream: the URL must not contain user:password@"
                " (URLs are logged); send credentials with upstream headers such as Authorization"
            ],
            id="upstream-credentials-not-echoed",
        ),
        pytest.param(
            MINIMAL.replace("http://127.0.0.1:8000/events", "{uri: http://a/events}"),
            [
                'config.yaml:4: routes[0].upstream.uri: unknown key; did you mean "url"?',
                "config.yaml:4: routes[0].upstream.url: missing; expected the URL of the app's"
                ' stream, like "http://127.0.0.1:8000/events"',
            ],
            id="upstream-mapping-did-you-mean",
        ),
        pytest.param(
            MINIMAL.replace(
                "http://127.0.0.1:8000/events",
                "{url: 'http://a/e', backoff_base: 10s, backoff_max: 5s}",
            ),
            [
                "config.yaml:4: routes[0].upstream.backoff_max: expected at least backoff_base"
                " (10s), got 5s"
            ],
            id="backoff-max-below-base",
        ),
        pytest.param(
            MINIMAL.replace(
                "http://127.0.0.1:8000/events",
                "{url: 'http://a/e', max_line_bytes: 8MiB}",
            ),
            [
                "config.yaml:4: routes[0].upstream.max_line_bytes: expected at most"
                " max_event_bytes (4MiB), got 8MiB: a line is part of an event"
            ],
            id="line-over-event",
        ),
        pytest.param(
            MINIMAL.replace(
                "http://127.0.0.1:8000/events",
                "{url: 'http://a/e', connect_timeout: 0, idle_timeout: soon}",
            ),
            [
                "config.yaml:4: routes[0].upstream.connect_timeout: expected a duration greater"
                " than 0, got 0",
                f"config.yaml:4: routes[0].upstream.idle_timeout: expected {DURATION_EXPECTED},"
                ' got "soon"',
            ],
            id="upstream-timeouts",
        ),
        # upstream headers
        *[
            pytest.param(
                MINIMAL.replace(
                    "http://127.0.0.1:8000/events", f"{{url: 'http://a/e', headers: {headers}}}"
                ),
                [f"config.yaml:4: routes[0].upstream.headers{where}: {message}"],
                id=case_id,
            )
            for headers, where, message, case_id in [
                (
                    "[Authorization]",
                    "",
                    "expected a mapping of header names to values, like {Authorization:"
                    ' "Bearer ..."}, got a list',
                    "headers-list",
                ),
                (
                    "{'X Tenant': a}",
                    '["X Tenant"]',
                    "not a valid HTTP header name; use letters, digits and !#$%&'*+-.^_`|~ only"
                    " (RFC 9110 §5.6.2)",
                    "header-name-space",
                ),
                (
                    "{'Authorization': \"Bearer s3cret\\r\\nX-Evil: 1\"}",
                    ".Authorization",
                    "the value must not contain CR, LF or NUL"
                    " (value not shown: it may be a secret)",
                    "header-value-crlf-not-echoed",
                ),
                (
                    "{'Authorization': \"Bearer s3cret\\0\"}",
                    ".Authorization",
                    "the value must not contain CR, LF or NUL"
                    " (value not shown: it may be a secret)",
                    "header-value-nul",
                ),
                (
                    "{'Authorization': ' Bearer s3cret'}",
                    ".Authorization",
                    "the value must be printable ASCII without leading or trailing spaces"
                    " (value not shown: it may be a secret)",
                    "header-value-leading-space",
                ),
                (
                    "{'X-Tenant': 42}",
                    ".X-Tenant",
                    "expected a string value, got a number; put the value in quotes",
                    "header-value-number",
                ),
                (
                    "{'Host': example.com}",
                    ".Host",
                    "Host cannot be set here: it comes from the upstream URL",
                    "header-host-managed",
                ),
                (
                    "{'last-event-id': '5'}",
                    ".last-event-id",
                    "last-event-id cannot be set here: ssefan sends it itself to resume the stream",
                    "header-last-event-id-managed",
                ),
                (
                    "{'X-Tenant': a, 'x-tenant': b}",
                    ".x-tenant",
                    "repeats X-Tenant (header names ignore case); keep one",
                    "header-repeated-in-other-case",
                ),
            ]
        ],
        # cors
        pytest.param(
            with_route_keys("cors: {allow_credentials: true}"),
            [
                "config.yaml:5: routes[0].cors.allow_origins: missing; expected a list of origins"
                ' like ["https://app.example.com"] or ["*"]'
            ],
            id="cors-origins-missing",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: '*'}"),
            [
                "config.yaml:5: routes[0].cors.allow_origins: expected a list of origins like"
                ' ["https://app.example.com"] or ["*"], got "*"'
            ],
            id="cors-origins-string",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: []}"),
            [
                "config.yaml:5: routes[0].cors.allow_origins: expected a list of origins like"
                ' ["https://app.example.com"] or ["*"], got an empty list'
            ],
            id="cors-origins-empty",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: ['*', 'https://a.example']}"),
            [
                'config.yaml:5: routes[0].cors.allow_origins: "*" already allows every origin;'
                ' use ["*"] alone or list origins'
            ],
            id="cors-wildcard-and-origin",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: ['*'], allow_credentials: true}"),
            [
                'config.yaml:5: routes[0].cors: allow_origins ["*"] with allow_credentials: true:'
                " browsers reject credentials with a wildcard origin; list the origins"
            ],
            id="cors-wildcard-with-credentials",
        ),
        pytest.param(
            with_route_keys(
                "cors: {allow_origins: [https://a.example], allow_credentials: 'true'}"
            ),
            [
                "config.yaml:5: routes[0].cors.allow_credentials: expected true or false,"
                ' got "true"; remove the quotes'
            ],
            id="cors-credentials-quoted",
        ),
        pytest.param(
            with_route_keys("cors: {allow_origins: [https://a.example], allow_credentials: 1}"),
            ["config.yaml:5: routes[0].cors.allow_credentials: expected true or false, got 1"],
            id="cors-credentials-number",
        ),
        *[
            pytest.param(
                with_route_keys(f"cors: {{allow_origins: ['{origin}']}}"),
                [
                    "config.yaml:5: routes[0].cors.allow_origins[0]: expected an origin like"
                    ' "https://app.example.com" (scheme://host[:port], no path),'
                    f' got "{origin}"{hint}'
                ],
                id=case_id,
            )
            for origin, hint, case_id in [
                ("https://app.example.com/", '; drop the trailing "/"', "origin-trailing-slash"),
                ("https://app.example.com/app", "", "origin-path"),
                ("app.example.com", "", "origin-no-scheme"),
                ("https://", "", "origin-no-host"),
                ("https://app.example.com?x", "", "origin-query"),
                ("https://u@app.example.com", "", "origin-userinfo"),
                ("https://app.example.com:99999", "", "origin-bad-port"),
                ("null", "", "origin-null"),
            ]
        ],
        # proxy
        pytest.param(
            MINIMAL + "proxy: 5s\n",
            ['config.yaml:5: proxy: expected a mapping of pass-through settings, got "5s"'],
            id="proxy-not-a-mapping",
        ),
        pytest.param(
            MINIMAL + "proxy: {pool_sise: 4}\n",
            ['config.yaml:5: proxy.pool_sise: unknown key; did you mean "pool_size"?'],
            id="proxy-did-you-mean",
        ),
        *[
            pytest.param(
                MINIMAL + f"proxy: {{{key}: {value}}}\n",
                [f"config.yaml:5: proxy.{key}: {message}"],
                id=f"proxy-{key}",
            )
            for key, value, message in [
                ("connect_timeout", "0", "expected a duration greater than 0, got 0"),
                ("first_byte_timeout", "0s", 'expected a duration greater than 0, got "0s"'),
                ("idle_timeout", "soon", f'expected {DURATION_EXPECTED}, got "soon"'),
                ("max_body_bytes", "0", "expected a size greater than 0, got 0"),
                ("pool_size", "-1", "expected an integer >= 0, got -1"),
                ("pool_size", "2.5", "expected an integer >= 0, got 2.5"),
                ("pool_idle_timeout", "-1s", 'expected a duration of 0 or more, got "-1s"'),
            ]
        ],
        pytest.param(
            MINIMAL + "pool_size: 4\n",
            ['config.yaml:5: pool_size: unknown key here; "pool_size" belongs under proxy'],
            id="proxy-key-at-top",
        ),
        pytest.param(
            MINIMAL + "connect_timeout: 4s\n",
            [
                'config.yaml:5: connect_timeout: unknown key here; "connect_timeout" belongs'
                " under proxy (requests passed to app) or a route's upstream (its stream)"
            ],
            id="proxy-or-upstream-key-at-top",
        ),
        pytest.param(
            with_route_keys("max_body_bytes: 1MiB"),
            [
                'config.yaml:5: routes[0].max_body_bytes: unknown key here; "max_body_bytes"'
                " belongs under the top-level proxy"
            ],
            id="proxy-key-in-route",
        ),
        # trusted_proxies
        pytest.param(
            MINIMAL + "trusted_proxies: 10.0.0.0/8\n",
            [
                "config.yaml:5: trusted_proxies: expected a list of IP addresses or CIDRs like"
                ' ["10.0.0.0/8", "127.0.0.1"], got "10.0.0.0/8"'
            ],
            id="trusted-proxies-string",
        ),
        *[
            pytest.param(
                MINIMAL + f"trusted_proxies: [{value}]\n",
                [
                    "config.yaml:5: trusted_proxies[0]: expected an IP address or CIDR like"
                    f' "10.0.0.0/8" or "::1", got {shown}'
                ],
                id=case_id,
            )
            for value, shown, case_id in [
                ("lb.internal", '"lb.internal"', "trusted-proxy-hostname"),
                ("10.0.0.0/33", '"10.0.0.0/33"', "trusted-proxy-prefix-too-long"),
                ("'10.0.0.256'", '"10.0.0.256"', "trusted-proxy-bad-octet"),
                ("'*'", '"*"', "trusted-proxy-wildcard"),
                ("167772161", "167772161", "trusted-proxy-integer"),
                ("null", "null", "trusted-proxy-null"),
            ]
        ],
        pytest.param(
            MINIMAL + "trusted_proxies: [10.0.0.1/8, 10.9.9.9/8]\n",
            [
                'config.yaml:5: trusted_proxies[1]: "10.0.0.0/8" is already listed as'
                " trusted_proxies[0]; keep one"
            ],
            id="trusted-proxies-repeated-after-normalising",
        ),
        # admin
        pytest.param(
            MINIMAL + "admin: 127.0.0.1:9090\n",
            [
                "config.yaml:5: admin: expected a mapping with listen,"
                ' like {listen: "127.0.0.1:9090"}, got "127.0.0.1:9090"'
            ],
            id="admin-string",
        ),
        pytest.param(
            MINIMAL + "admin: {}\n",
            [
                "config.yaml:5: admin.listen: missing; expected the address for the admin"
                ' endpoints, like "127.0.0.1:9090"'
            ],
            id="admin-empty",
        ),
        pytest.param(
            MINIMAL + "admin: {listen: 127.0.0.1:9090, metrics: true}\n",
            ["config.yaml:5: admin.metrics: unknown key; expected one of: listen"],
            id="admin-unknown-key",
        ),
        pytest.param(
            MINIMAL + "admin: {listen: 9090}\n",
            [
                'config.yaml:5: admin.listen: expected "host:port" like "127.0.0.1:8080" or'
                ' "[::1]:8080", got 9090; write "127.0.0.1:9090" (this host only)'
                ' or "0.0.0.0:9090" (every interface)'
            ],
            id="admin-bare-port",
        ),
        pytest.param(
            MINIMAL + "admin: {listen: 127.0.0.1:8080}\n",
            [
                "config.yaml:5: admin.listen: 127.0.0.1:8080 is the same address as listen;"
                " give the admin endpoints a port of their own"
            ],
            id="admin-same-as-listen",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", '"[::1]:8080"') + "admin: {listen: '[::]:8080'}\n",
            [
                "config.yaml:5: admin.listen: [::]:8080 overlaps listen ([::1]:8080);"
                " give the admin endpoints a port of their own"
            ],
            id="admin-wildcard-overlaps-listen",
        ),
        pytest.param(
            MINIMAL.replace("127.0.0.1:8080", "0.0.0.0:8080") + "admin: {listen: 127.0.0.1:8080}\n",
            [
                "config.yaml:5: admin.listen: 127.0.0.1:8080 overlaps listen (0.0.0.0:8080);"
                " give the admin endpoints a port of their own"
            ],
            id="admin-overlaps-wildcard-listen",
        ),
        # workers and lifecycle
        *[
            pytest.param(
                MINIMAL + f"workers: {value}\n",
                [
                    'config.yaml:5: workers: expected an integer >= 1 or "auto" (one per CPU),'
                    f" got {shown}"
                ],
                id=case_id,
            )
            for value, shown, case_id in [
                ("0", "0", "workers-zero"),
                ("Auto", '"Auto"; did you mean "auto"?', "workers-auto-capitalised"),
                ("'4'", '"4"', "workers-quoted"),
                ("2.0", "2.0", "workers-float"),
                ("true", "true", "workers-boolean"),
            ]
        ],
        pytest.param(
            MINIMAL + "drain_window: -1s\n",
            ['config.yaml:5: drain_window: expected a duration of 0 or more, got "-1s"'],
            id="drain-window-negative",
        ),
        pytest.param(
            MINIMAL + "shutdown_timeout: 0\n",
            [
                "config.yaml:5: shutdown_timeout: expected a duration greater than 0, got 0",
            ],
            id="shutdown-timeout-zero",
        ),
        pytest.param(
            MINIMAL + "drain_window: 30s\nshutdown_timeout: 30s\n",
            [
                "config.yaml:6: shutdown_timeout: expected more than drain_window (30s), got 30s:"
                " the streams must be drained before the deadline"
            ],
            id="shutdown-timeout-equal-to-drain-window",
        ),
        pytest.param(
            MINIMAL + "shutdown_timeout: 5s\n",
            [
                "config.yaml:5: shutdown_timeout: expected more than drain_window (10s), got 5s:"
                " the streams must be drained before the deadline"
            ],
            id="shutdown-timeout-below-default-drain-window",
        ),
        pytest.param(
            MINIMAL + "ready_timeout: 0ms\n",
            ['config.yaml:5: ready_timeout: expected a duration greater than 0, got "0ms"'],
            id="ready-timeout-zero",
        ),
        pytest.param(
            MINIMAL + "readiness_timeout: 5s\n",
            ['config.yaml:5: readiness_timeout: unknown key; did you mean "ready_timeout"?'],
            id="ready-timeout-did-you-mean",
        ),
        # auth
        pytest.param(
            with_route_keys("auth: http://a/auth"),
            [
                "config.yaml:5: routes[0].auth: expected a mapping with url, like"
                ' {url: "http://127.0.0.1:8000/auth"}, got "http://a/auth"'
            ],
            id="auth-string",
        ),
        pytest.param(
            with_route_keys("auth: {cache: 1m}"),
            [
                "config.yaml:5: routes[0].auth.url: missing; expected the URL that decides who"
                ' may listen, like "http://127.0.0.1:8000/auth"'
            ],
            id="auth-url-missing",
        ),
        pytest.param(
            with_route_keys("auth: {url: 'http://a/auth', cahce: 1m}"),
            ['config.yaml:5: routes[0].auth.cahce: unknown key; did you mean "cache"?'],
            id="auth-did-you-mean",
        ),
        pytest.param(
            with_route_keys("token_param: token"),
            [
                'config.yaml:5: routes[0].token_param: unknown key here; "token_param" belongs'
                " under auth"
            ],
            id="auth-key-in-route",
        ),
        pytest.param(
            MINIMAL + "revalidate: 5m\n",
            [
                'config.yaml:5: revalidate: unknown key here; "revalidate" belongs under'
                " a route's auth"
            ],
            id="auth-key-at-top",
        ),
        *[
            pytest.param(
                with_route_keys(f"auth: {{url: {url}}}"),
                [f"config.yaml:5: routes[0].auth.url: {message}"],
                id=case_id,
            )
            for url, message, case_id in [
                (
                    "/auth",
                    'expected an http:// or https:// URL like "http://127.0.0.1:8000/auth",'
                    ' got "/auth"',
                    "auth-url-relative",
                ),
                (
                    "'http://a/auth#x'",
                    'expected a URL without #fragment (it is never sent), got "http://a/auth#x"',
                    "auth-url-fragment",
                ),
                (
                    "'https://u:hunter2@a/auth'",
                    "the URL must not contain user:password@ (URLs are logged);"
                    " the client's forwarded headers are the credentials",
                    "auth-url-credentials-not-echoed",
                ),
            ]
        ],
        pytest.param(
            with_route_keys("auth: {url: 'http://a/auth', forward: cookie}"),
            [
                "config.yaml:5: routes[0].auth.forward: expected a list of header names like"
                ' [cookie, authorization], got "cookie"'
            ],
            id="auth-forward-string",
        ),
        *[
            pytest.param(
                with_route_keys(f"auth: {{url: 'http://a/auth', forward: [Cookie, {name}]}}"),
                [f"config.yaml:5: routes[0].auth.forward[1]: {message}"],
                id=case_id,
            )
            for name, message, case_id in [
                (
                    "'X Session'",
                    'expected an HTTP header name like "cookie" (letters, digits and'
                    ' !#$%&\'*+-.^_`|~ only, RFC 9110 §5.6.2), got "X Session"',
                    "auth-forward-bad-name",
                ),
                (
                    "''",
                    'expected an HTTP header name like "cookie" (letters, digits and'
                    ' !#$%&\'*+-.^_`|~ only, RFC 9110 §5.6.2), got ""',
                    "auth-forward-empty-name",
                ),
                (
                    "7",
                    'expected an HTTP header name like "cookie" (letters, digits and'
                    " !#$%&'*+-.^_`|~ only, RFC 9110 §5.6.2), got 7",
                    "auth-forward-number",
                ),
                (
                    "COOKIE",
                    "repeats cookie (header names ignore case); keep one",
                    "auth-forward-repeated-in-other-case",
                ),
                (
                    "Host",
                    "Host cannot be sent to the auth endpoint: the auth request's Host comes"
                    " from auth.url",
                    "auth-forward-host",
                ),
                (
                    "Content-Length",
                    "Content-Length cannot be sent to the auth endpoint: the auth request is"
                    " a GET without a body",
                    "auth-forward-content-length",
                ),
                (
                    "connection",
                    "connection cannot be sent to the auth endpoint: it is a hop-by-hop header"
                    " ssefan manages",
                    "auth-forward-hop-by-hop",
                ),
            ]
        ],
        *[
            pytest.param(
                with_route_keys(f"auth: {{url: 'http://a/auth', {key}: {value}}}"),
                [f"config.yaml:5: routes[0].auth.{key}: {message}"],
                id=f"auth-{case_id}",
            )
            for key, value, message, case_id in [
                ("cache", "-1", "expected a duration of 0 or more, got -1", "cache-negative"),
                ("cache", "forever", f'expected {DURATION_EXPECTED}, got "forever"', "cache-word"),
                ("timeout", "0", "expected a duration greater than 0, got 0", "timeout-zero"),
                (
                    "revalidate",
                    "0s",
                    'expected a duration greater than 0, got "0s"',
                    "revalidate-zero",
                ),
                (
                    "token_param",
                    "''",
                    'expected a query parameter name like "token" (letters, digits and -._~'
                    ' only), got ""',
                    "token-param-empty",
                ),
                (
                    "token_param",
                    "'my token'",
                    'expected a query parameter name like "token" (letters, digits and -._~'
                    ' only), got "my token"',
                    "token-param-space",
                ),
                (
                    "token_param",
                    "'t&x'",
                    'expected a query parameter name like "token" (letters, digits and -._~'
                    ' only), got "t&x"',
                    "token-param-ampersand",
                ),
                (
                    "token_param",
                    "42",
                    'expected a query parameter name like "token" (letters, digits and -._~'
                    " only), got 42",
                    "token-param-number",
                ),
                (
                    "token_param",
                    "last_event_id",
                    'expected a name other than "last_event_id", which clients use to resume'
                    ' (Last-Event-ID); use e.g. "token"',
                    "token-param-last-event-id",
                ),
                (
                    "token_header",
                    "'X Token'",
                    'expected an HTTP header name like "cookie" (letters, digits and'
                    ' !#$%&\'*+-.^_`|~ only, RFC 9110 §5.6.2), got "X Token"',
                    "token-header-bad-name",
                ),
                (
                    "token_header",
                    "null",
                    'expected an HTTP header name like "cookie" (letters, digits and'
                    " !#$%&'*+-.^_`|~ only, RFC 9110 §5.6.2), got null",
                    "token-header-null",
                ),
                (
                    "token_header",
                    "Host",
                    "Host cannot be sent to the auth endpoint: the auth request's Host comes"
                    " from auth.url",
                    "token-header-host",
                ),
                (
                    "token_scheme",
                    "'Bearer '",
                    'expected an auth scheme like "Bearer", or "" to send the token alone,'
                    ' got "Bearer "',
                    "token-scheme-trailing-space",
                ),
                (
                    "token_scheme",
                    "null",
                    'expected an auth scheme like "Bearer", or "" to send the token alone,'
                    " got null",
                    "token-scheme-null",
                ),
                (
                    "token_scheme",
                    '"Bearer\\r\\nX: 1"',
                    'expected an auth scheme like "Bearer", or "" to send the token alone,'
                    ' got "Bearer\\r\\nX: 1"',
                    "token-scheme-crlf",
                ),
            ]
        ],
    ],
)
def test_bad_config(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


def test_secrets_never_appear_in_messages() -> None:
    text = MINIMAL.replace(
        "http://127.0.0.1:8000/events",
        "{url: 'https://bot:hunter2@a/e', headers: {Authorization: \"Bearer hunter2\\n\"}}",
    )
    found = problems(text)
    assert len(found) == 2
    assert not any("hunter2" in line for line in found)


def test_every_problem_is_reported_at_once() -> None:
    # Each problem names the line of its key; a route's problems come in the
    # order its keys are read, the cross-route check after them.
    text = """\
        listen: localhost
        app: ftp://x
        max_clients: lots
        routes:
          - path: /a
            upstream: http://127.0.0.1:8000/a
            hearbeat: 5s
            buffer: 0
            cors: {allow_origins: ["*"], allow_credentials: true}
          - path: /a
            upstream:
              url: http://127.0.0.1:8000/b
              headers: {"Bad Name": x}
            heartbeat: fast
            start: {events: 10, age: 1m}
            mode: eagre
        header_timeout: never
    """
    assert problems(textwrap.dedent(text)) == [
        'config.yaml:1: listen: expected "host:port" like "127.0.0.1:8080" or "[::1]:8080",'
        ' got "localhost"',
        'config.yaml:2: app: expected an http:// or https:// URL like "http://127.0.0.1:8000",'
        ' got "ftp://x"',
        'config.yaml:7: routes[0].hearbeat: unknown key; did you mean "heartbeat"?',
        "config.yaml:8: routes[0].buffer: expected an integer >= 1, got 0",
        'config.yaml:9: routes[0].cors: allow_origins ["*"] with allow_credentials: true:'
        " browsers reject credentials with a wildcard origin; list the origins",
        'config.yaml:13: routes[1].upstream.headers["Bad Name"]: not a valid HTTP header name;'
        " use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 §5.6.2)",
        f'config.yaml:14: routes[1].heartbeat: expected {DURATION_EXPECTED}, got "fast"',
        'config.yaml:16: routes[1].mode: expected "eager" or "lazy", got "eagre";'
        ' did you mean "eager"?',
        "config.yaml:15: routes[1].start: expected exactly one of events or age",
        'config.yaml:10: routes[1].path: "/a" is already the path of routes[0];'
        " each path serves one stream",
        'config.yaml:3: max_clients: expected an integer >= 1, got "lots"',
        f'config.yaml:17: header_timeout: expected {DURATION_EXPECTED}, got "never"',
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            """\
            # ssefan

            listen: 127.0.0.1:8080

            # streams
            routes:
              - path: /events
                upstream: http://127.0.0.1:8000/events
                # subscribe on the first client
                mode: lazzy
            """,
            [
                'config.yaml:10: routes[0].mode: expected "eager" or "lazy", got "lazzy";'
                ' did you mean "lazy"?'
            ],
            id="after-comments-and-blank-lines",
        ),
        pytest.param(
            """\
            listen: 127.0.0.1:8080
            routes:
              - path: /events
                upstream:
                  url: http://127.0.0.1:8000/events
                  idle_timout: 60s
                  idle_timeout: never
            """,
            [
                "config.yaml:6: routes[0].upstream.idle_timout: unknown key;"
                ' did you mean "idle_timeout"?',
                f"config.yaml:7: routes[0].upstream.idle_timeout: expected {DURATION_EXPECTED},"
                ' got "never"',
            ],
            id="nested-block-mapping",
        ),
        pytest.param(
            """\
            listen: 127.0.0.1:8080
            routes:
              - path: /events
                upstream:
                  headers: {X-Tenant: a}
            """,
            [
                "config.yaml:4: routes[0].upstream.url: missing; expected the URL of the app's"
                ' stream, like "http://127.0.0.1:8000/events"'
            ],
            id="missing-key-names-its-mapping",
        ),
        pytest.param(
            """\
            listen: 127.0.0.1:8080
            routes:
              - path: /a
                upstream: http://127.0.0.1:8000/a

              - path: /b
            """,
            [
                "config.yaml:6: routes[1].upstream: missing; expected the URL of the app's"
                ' stream, like "http://127.0.0.1:8000/events"'
            ],
            id="missing-key-names-its-list-item",
        ),
        pytest.param(
            """\
            # no listen here
            app: http://127.0.0.1:8000
            """,
            [
                "config.yaml:2: listen: missing; expected the address to serve on,"
                ' like "127.0.0.1:8080"'
            ],
            id="missing-top-level-key-names-the-first-key",
        ),
        pytest.param(
            MINIMAL + "trusted_proxies:\n  - 10.0.0.0/8\n  - nope\n",
            [
                "config.yaml:7: trusted_proxies[1]: expected an IP address or CIDR like"
                ' "10.0.0.0/8" or "::1", got "nope"'
            ],
            id="block-list-item",
        ),
        pytest.param(
            MINIMAL.replace(
                "upstream: http://127.0.0.1:8000/events",
                "upstream:\n      url: http://a/e\n      headers:\n"
                "        X-Tenant: a\n        Bad Name: b\n        8080: c\n",
            ),
            [
                'config.yaml:8: routes[0].upstream.headers["Bad Name"]: not a valid HTTP header'
                " name; use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 §5.6.2)",
                'config.yaml:9: routes[0].upstream.headers["8080"]: not a valid HTTP header'
                " name; use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 §5.6.2)",
            ],
            id="quoted-and-number-keys",
        ),
        pytest.param(
            """\
            listen: 127.0.0.1:8080
            routes:
              - &base
                path: /a
                upstream: http://127.0.0.1:8000/a
                buffer: 0
              - <<: *base
                path: /b
                buffer_age: -1s
            """,
            [
                "config.yaml:6: routes[0].buffer: expected an integer >= 1, got 0",
                # Merged from the anchor: the line where the value is written.
                "config.yaml:6: routes[1].buffer: expected an integer >= 1, got 0",
                'config.yaml:9: routes[1].buffer_age: expected a duration of 0 or more, got "-1s"',
            ],
            id="merge-key-names-the-anchor-line",
        ),
        pytest.param(
            MINIMAL + "proxy: {\n  pool_size: 4,\n  max_body_bytes: 0\n}\n",
            ["config.yaml:7: proxy.max_body_bytes: expected a size greater than 0, got 0"],
            id="flow-mapping-over-lines",
        ),
        pytest.param(
            MINIMAL + "drain_window: 45s\n",
            [
                "config.yaml:5: shutdown_timeout: expected more than drain_window (45s), got 30s:"
                " the streams must be drained before the deadline"
            ],
            id="unset-shutdown-timeout-names-drain-window",
        ),
        pytest.param(
            MINIMAL + "shutdown_timeout: 8s\n",
            [
                "config.yaml:5: shutdown_timeout: expected more than drain_window (10s), got 8s:"
                " the streams must be drained before the deadline"
            ],
            id="set-shutdown-timeout-names-itself",
        ),
        pytest.param(
            MINIMAL.replace(
                "upstream: http://127.0.0.1:8000/events",
                "upstream:\n      url: http://a/e\n      backoff_base: 1m\n"
                "      max_event_bytes: 64KiB\n",
            ),
            [
                "config.yaml:6: routes[0].upstream.backoff_max: expected at least backoff_base"
                " (1m), got 30s",
                "config.yaml:7: routes[0].upstream.max_line_bytes: expected at most"
                " max_event_bytes (64KiB), got 1MiB: a line is part of an event",
            ],
            id="unset-upstream-limits-name-the-key-set",
        ),
        pytest.param(
            MINIMAL + "admin:\n  listen: 127.0.0.1:8080\n",
            [
                "config.yaml:6: admin.listen: 127.0.0.1:8080 is the same address as listen;"
                " give the admin endpoints a port of their own"
            ],
            id="admin-listen-clash",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: not a list\n",
            ['config.yaml:2: routes: expected a list of routes (- path: ...), got "not a list"'],
            id="wrong-type",
        ),
    ],
)
def test_problem_names_the_line_of_its_key(text: str, expected: list[str]) -> None:
    assert problems(textwrap.dedent(text)) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        pytest.param("mode: eagre", 'got "eagre"; did you mean "eager"?', id="mode"),
        pytest.param("mode: Lazy", 'got "Lazy"; did you mean "lazy"?', id="mode-case"),
        pytest.param("mode: z", 'got "z"', id="mode-nothing-close"),
        pytest.param("mode: 1", "got 1", id="mode-number"),
        pytest.param("on_gap: replya", 'got "replya"; did you mean "replay"?', id="on-gap"),
        pytest.param("on_gap: LIVE", 'got "LIVE"; did you mean "live"?', id="on-gap-case"),
        pytest.param("refuse: stauts", 'got "stauts"; did you mean "status"?', id="refuse"),
        pytest.param("start: lvie", 'got "lvie"; did you mean "live"?', id="start-live"),
        pytest.param("start: age", 'got "age"; did you mean {age: DURATION}?', id="start-age"),
        pytest.param("start: now", 'got "now"', id="start-nothing-close"),
        pytest.param("protect_variants: ture", 'got "ture"; did you mean true?', id="boolean-typo"),
        pytest.param(
            "protect_variants: 'false'", 'got "false"; remove the quotes', id="boolean-quoted"
        ),
    ],
)
def test_enum_values_suggest_the_closest(line: str, expected: str) -> None:
    [message] = problems(with_route_keys(line))
    key = line.split(":")[0]
    assert message.startswith(f"config.yaml:5: routes[0].{key}: expected ")
    assert message.endswith(expected)


def test_workers_suggests_auto() -> None:
    assert problems(MINIMAL + "workers: atuo\n") == [
        'config.yaml:5: workers: expected an integer >= 1 or "auto" (one per CPU), got "atuo";'
        ' did you mean "auto"?'
    ]


def test_config_error_text_is_one_problem_per_line() -> None:
    err = ConfigError(["a.yaml: x: first", "a.yaml: y: second"])
    assert str(err) == "a.yaml: x: first\na.yaml: y: second"
    assert err.problems == ["a.yaml: x: first", "a.yaml: y: second"]


# --- YAML itself and the file ----------------------------------------------------


INDENT = "indent each key of a mapping by the same number of spaces (no tabs)"
DEEPER = "so YAML reads it as more of that key's value"
ALIAS = '"*" at the start of a value makes it an alias (a reference to an anchor) in YAML'


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        # indentation
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n\t- path: /a\n",
            "line 3, column 1",
            "a tab character: YAML does not allow tabs for indentation; indent with spaces",
            id="tab-indent",
        ),
        pytest.param(
            "proxy:\n  pool_size: 1\n\tidle_timeout: 5s\n",
            "line 3, column 1",
            "a tab character: YAML does not allow tabs for indentation; indent with spaces",
            id="tab-in-mapping",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - path: /a\n     upstream: http://a/e\n",
            "line 4, column 14",
            f"this line is indented deeper than the key on line 3, {DEEPER}: {INDENT}",
            id="key-indented-deeper",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\n routes: []\n",
            "line 2, column 8",
            f"this line is indented deeper than the key on line 1, {DEEPER}: {INDENT}",
            id="top-key-indented",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - path: /a\n"
            "    upstream: http://a/e\n   heartbeat: 5s\n",
            "line 5, column 4",
            f"the indentation of this line (3 spaces) does not match the lines above it: {INDENT}",
            id="key-indented-less",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - path: /a\n upstream: http://a/e\n",
            "line 4, column 2",
            f"the indentation of this line (1 space) does not match the lines above it: {INDENT}",
            id="key-between-levels",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - path: /a\n"
            "    upstream: http://a/e\n - path: /b\n",
            "line 5, column 2",
            f"the indentation of this line (1 space) does not match the lines above it: {INDENT}",
            id="list-item-dedented",
        ),
        pytest.param(
            "proxy:\n    pool_size: 1\n  idle_timeout: 5s\n",
            "line 3, column 3",
            f"the indentation of this line (2 spaces) does not match the lines above it: {INDENT}",
            id="nested-mapping-indent",
        ),
        # lists and keys
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  -path: /a\n  - path: /b\n",
            "line 4, column 3",
            'line 3 starts with "-path", which YAML reads as a key:'
            ' put a space after "-" to make it a list item',
            id="list-item-without-space",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\n- path: /a\n",
            "line 2, column 1",
            'a list item ("- ") where a key was expected: a list must be the value of a key,'
            ' indented under "key:"',
            id="list-item-in-mapping",
        ),
        pytest.param(
            "listen 127.0.0.1:8080\nroutes: []\n",
            "line 2, column 7",
            'line 1 has no ":" after its key, so YAML reads it and this line as one text:'
            ' write it as "key: value"',
            id="key-without-colon",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes\n  - path: /a\n",
            "line 3, column 9",
            'line 2 ("routes") has no ":" after its key: write it as "key: value",'
            ' or "key:" with the value indented on the lines below',
            id="key-without-colon-before-list",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes:\n  - path: /a\n    upstream: a: b\n",
            "line 4, column 16",
            'this value contains ": ", which YAML reads as the start of another key:'
            ' put the value in quotes, e.g. upstream: "a: b"',
            id="colon-in-value",
        ),
        pytest.param(
            'heartbeat_event: say "hi": now\n',
            "line 1, column 26",
            'this value contains ": ", which YAML reads as the start of another key:'
            " put the value in quotes, e.g. heartbeat_event: 'say \"hi\": now'",
            id="colon-in-value-with-quotes",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\n[a, b]: 1\n",
            "line 2, column 1",
            'a list or mapping is used as a key: keys are plain names, like "path"',
            id="list-as-key",
        ),
        # quotes and brackets
        pytest.param(
            'listen: "127.0.0.1":8080\n',
            "line 1, column 20",
            "text follows the closing quote of a value: put the whole value inside the quotes",
            id="text-after-quote",
        ),
        pytest.param(
            'listen: "127.0.0.1:8080\nroutes: []\n',
            "line 3, column 1",
            'the quoted value that starts with " at line 1, column 9 has no closing ":'
            ' add " at the end of the value',
            id="unclosed-double-quote",
        ),
        pytest.param(
            "app: 'http://127.0.0.1:8000\nlisten: 127.0.0.1:8080\n",
            "line 3, column 1",
            "the quoted value that starts with ' at line 1, column 6 has no closing ':"
            " add ' at the end of the value",
            id="unclosed-single-quote",
        ),
        pytest.param(
            'heartbeat_event: "C:\\path"\n',
            "line 1, column 22",
            'inside double quotes "\\" starts an escape and "\\p" is not one:'
            ' put the value in single quotes instead, or write each "\\" as "\\\\"',
            id="backslash-in-double-quotes",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: [/a, /b\n",
            "line 3, column 1",
            'the list opened with "[" at line 2, column 9 is never closed: end it with "]"',
            id="unclosed-flow-sequence",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nproxy: {pool_size: 1\nroutes: []\n",
            "line 3, column 7",
            'the mapping opened with "{" at line 2, column 8 is not closed where expected:'
            ' separate its items with "," and end it with "}"; quote items that contain ": "'
            ' or " #"',
            id="unclosed-flow-mapping",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: [\n",
            "line 3, column 1",
            'the file ends where a value was expected: close the "[" or "{" opened above,'
            " or finish the value",
            id="file-ends-in-flow",
        ),
        pytest.param(
            "listen: 127.0.0.1:8080\nroutes: [/a]]\n",
            "line 2, column 13",
            'a "]" that closes nothing: remove it, or quote the value',
            id="stray-bracket",
        ),
        pytest.param(
            "listen: [::1]:8080\n",
            "line 1, column 10",
            'a value that starts with "[" is a list in YAML: quote bracketed IPv6 addresses,'
            ' e.g. listen: "[::1]:8080"',
            id="unquoted-ipv6",
        ),
        # characters YAML gives a meaning
        pytest.param(
            "cors: {allow_origins: [*]}\n",
            "line 1, column 25",
            f'{ALIAS}: quote the value, e.g. "*"',
            id="unquoted-star",
        ),
        pytest.param(
            "listen: *main\n",
            "line 1, column 9",
            '"*main" refers to an anchor "&main" that is not defined above it:'
            ' define the anchor first, or quote the value if "*" is meant literally',
            id="undefined-alias",
        ),
        pytest.param(
            "a: &x 1\nb: &x 2\n",
            "line 2, column 4",
            'the anchor "&x" is defined twice (first at line 1, column 4):'
            " give each anchor its own name",
            id="duplicate-anchor",
        ),
        pytest.param(
            "listen: @host:80\n",
            "line 1, column 9",
            'a value cannot start with "@" in YAML (it is reserved): quote the value',
            id="reserved-at",
        ),
        pytest.param(
            "app: |x\n  http://a\n",
            "line 1, column 7",
            'only "+", "-" or an indentation digit may follow "|" or ">" on its line:'
            " start the text on the next line, or quote the value",
            id="block-scalar-indicator",
        ),
        pytest.param(
            "listen: x\nroutes: []\napp: \x1b[31m\n",
            "line 3, column 6",
            "the control character U+001B cannot appear in YAML: delete it"
            ' (inside double quotes it may be written as an escape, e.g. "\\x1b")',
            id="control-character",
        ),
        # the file as a whole
        pytest.param(
            "listen: 127.0.0.1:8080\n---\nroutes: []\n",
            "line 2, column 1",
            'a second YAML document starts here ("---"): keep one document in the file',
            id="two-documents",
        ),
        pytest.param(
            "listen: !!python/object/apply:os.getcwd []\n",
            "line 1, column 9",
            'the tag "!!python/object/apply:os.getcwd" asks for an object, not plain data,'
            " and ssefan reads plain data only (YAML safe loading): remove the tag",
            id="python-object-tag-refused",
        ),
        # not one we explain: PyYAML's words, still with line and column
        pytest.param(
            "listen: !x!y 1\n",
            "line 1, column 9",
            "found undefined tag handle '!x!'",
            id="unknown-keeps-pyyaml-text",
        ),
    ],
)
def test_yaml_syntax_error_says_what_to_change(text: str, where: str, message: str) -> None:
    assert problems(text) == [f"config.yaml: {where}: invalid YAML: {message}"]


def test_duplicate_keys_are_reported_with_both_lines() -> None:
    text = MINIMAL + "    heartbeat: 5s\n    heartbeat: 10s\nlisten: 0.0.0.0:80\n"
    assert problems(text) == [
        'config.yaml: line 6, column 5: duplicate key "heartbeat" (first at line 5, column 5);'
        " YAML would silently keep only the last one, so remove one of them",
        'config.yaml: line 7, column 1: duplicate key "listen" (first at line 1, column 1);'
        " YAML would silently keep only the last one, so remove one of them",
    ]


def test_merge_keys_may_be_overridden() -> None:
    text = """\
        listen: 127.0.0.1:8080
        routes:
          - &first
            path: /a
            upstream: http://127.0.0.1:8000/a
            heartbeat: 5s
          - <<: *first
            path: /b
            heartbeat: 7s
    """
    config = parse_config(textwrap.dedent(text))
    assert [(r.path, r.upstream.url, r.heartbeat) for r in config.routes] == [
        ("/a", "http://127.0.0.1:8000/a", 5.0),
        ("/b", "http://127.0.0.1:8000/a", 7.0),
    ]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: cannot read the file: No such file or directory"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: cannot read the file: Is a directory"]


def test_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"listen: caf\xe9:80\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}: not UTF-8 text (byte 0xe9 at offset 11)"]


def test_file_problems_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "max_clients: 0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [f"{path}:5: max_clients: expected an integer >= 1, got 0"]


# --- the example file and the docs -------------------------------------------------


def _uncomment_second_route(text: str) -> str:
    # The commented-out route is written as "  # - path: ..." / "  #   key: ...".
    return re.sub(r"^  # (?=- |  )", "  ", text, flags=re.MULTILINE)


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert config.listen == ListenConfig(host="127.0.0.1", port=8080)
    assert config.app == "http://127.0.0.1:8000"
    [route] = config.routes
    assert route.path == "/events"
    assert route.upstream == UpstreamConfig(url="http://127.0.0.1:8000/events")
    assert route.cors == CorsConfig(allow_origins=("https://app.example.com",))


def test_example_values_are_the_defaults() -> None:
    # The example writes each optional key with its default, and its comments
    # say "default ...": both must stay true when a default changes.
    config = load_config(EXAMPLE)
    defaults = Config(listen=config.listen, app=config.app, source=config.source)
    assert dataclasses.replace(config, routes=()) == defaults
    route = config.routes[0]
    assert route == RouteConfig(path=route.path, upstream=route.upstream, cors=route.cors)


def test_example_second_route_loads_when_uncommented() -> None:
    text = _uncomment_second_route(EXAMPLE.read_text())
    config = parse_config(text, "config.example.yaml")
    second = config.routes[1]
    assert second.path == "/orders/stream"
    assert second.upstream == UpstreamConfig(
        url="https://orders.internal.example.com/stream?tenant=acme",
        headers=(("Authorization", "Bearer change-me"),),
    )
    assert second.start == StartConfig(kind="events", count=10)
    # Its auth shows every key with its default, except the optional ones.
    assert second.auth == AuthConfig(
        url="http://127.0.0.1:8000/auth/stream", token_param="token", revalidate=300.0
    )


def test_example_admin_loads_when_uncommented() -> None:
    text = re.sub(r"^# (admin:|  listen: )", r"\1", EXAMPLE.read_text(), flags=re.MULTILINE)
    config = parse_config(text, "config.example.yaml")
    assert config.admin == AdminConfig(listen=ListenConfig(host="127.0.0.1", port=9090))


def test_token_param_refuses_what_the_server_reads_as_last_event_id() -> None:
    from ssefan.edge import admission  # here: the rest of this file needs only the config module

    for name in admission.LAST_EVENT_ID_PARAMS:
        [message] = problems(with_route_keys(f"auth: {{url: 'http://a/b', token_param: {name}}}"))
        assert f'expected a name other than "{name}"' in message


KEY_CLASSES = [
    Config,
    RouteConfig,
    UpstreamConfig,
    CorsConfig,
    AuthConfig,
    ProxyConfig,
    AdminConfig,
]
NOT_KEYS = {"source"}  # Config.source is the file's path, not something written in it


@pytest.mark.parametrize(
    "name",
    sorted({f.name for cls in KEY_CLASSES for f in dataclasses.fields(cls)} - NOT_KEYS),
)
def test_every_key_is_documented(name: str) -> None:
    example = _uncomment_second_route(EXAMPLE.read_text())
    # A key line, possibly still commented out ("# retry: 3s"), or inside {...}.
    assert re.search(rf"^\s*(#\s*)?(- )?{name}:|[{{,]\s*{name}:", example, re.MULTILINE), (
        f"{name} is not shown in config.example.yaml"
    )
    assert f"| `{name}` |" in DOCS.read_text(), f"{name} has no row in docs/configuration.md"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        pytest.param(
            lambda: ListenConfig(host="127.0.0.1", port=70000),
            "ListenConfig.port: expected from 0 to 65535, got 70000",
            id="port",
        ),
        pytest.param(
            lambda: UpstreamConfig(url="ftp://x/e"),
            "UpstreamConfig.url: expected an http:// or https:// URL, got 'ftp://x/e'",
            id="upstream-url",
        ),
        pytest.param(
            lambda: UpstreamConfig(url="http://x/e", idle_timeout=0),
            "UpstreamConfig.idle_timeout: expected > 0, got 0",
            id="idle-timeout",
        ),
        pytest.param(
            lambda: RouteConfig(path="/e", upstream=UpstreamConfig(url="http://x/e"), buffer=0),
            "RouteConfig.buffer: expected >= 1, got 0",
            id="buffer",
        ),
        pytest.param(
            lambda: RouteConfig(path="e", upstream=UpstreamConfig(url="http://x/e")),
            "RouteConfig.path: expected a path starting with \"/\", got 'e'",
            id="path",
        ),
        pytest.param(
            lambda: Config(listen=ListenConfig(host="127.0.0.1", port=0), workers=0),
            "Config.workers: expected >= 1, got 0",
            id="workers",
        ),
    ],
)
def test_a_config_built_in_code_is_checked_at_construction(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        build()
