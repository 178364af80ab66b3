"""The typed configuration: frozen dataclasses and their defaults.

These dataclasses are the contract the rest of ssefan is written against:
every duration is a float in seconds, every size an int in bytes.

The YAML loader reports every problem with its file, line and key path; a
config built in code (the demo, tests, benchmarks, an embedding program)
skips it, so each class also checks in `__post_init__` the invariants the
rest of the code relies on (a ring of at least one event, a positive
heartbeat, a port in range, a path that starts with "/"), and a broken one
fails at construction with a ValueError naming the field, not later inside
the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ssefan.config.values import MINUTES, SECONDS, KiB, MiB
from ssefan.core.template import DEFAULT_KEY_PATTERN


@dataclass(frozen=True, slots=True, kw_only=True)
class CorsConfig:
    # ["*"] or explicit origins such as "https://app.example.com".
    allow_origins: tuple[str, ...]
    # Echo the request's Origin and add `Vary: Origin`; never combined with "*".
    allow_credentials: bool = False
    # How long browsers may cache a preflight answer. 10 minutes is Chromium's cap
    # (Firefox allows 24 h), so a longer value buys nothing in the common browser.
    max_age: float = 10 * MINUTES


@dataclass(frozen=True, slots=True, kw_only=True)
class StartConfig:
    """Where a client that sends no Last-Event-ID starts."""

    # "live": only events published after it connects (default; what a browser
    # tab that just opened expects). "events": the last `count` events held.
    # "age": the events of the last `age` seconds.
    kind: Literal["live", "events", "age"] = "live"
    count: int = 0
    age: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyConfig:
    """What a template route's key may be. Keys come from the request: untrusted."""

    # Anchored (the whole key must match), ASCII classes only. The default holds
    # numbers, slugs and UUIDs; nothing in it needs percent-encoding.
    pattern: str = DEFAULT_KEY_PATTERN


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    url: str
    # Extra request headers for the app, e.g. Authorization. Never logged.
    headers: tuple[tuple[str, str], ...] = ()
    # TCP + TLS handshake budget. The app is on the same host; 5 s is already
    # generous and keeps a dead app from holding a route in "connecting" long.
    connect_timeout: float = 5 * SECONDS
    # Read-idle watchdog: no byte for this long means the stream is dead even if
    # TCP says otherwise. 45 s is three missed 15 s heartbeats from a well-behaved
    # app; raise it for apps that send nothing between rare events.
    idle_timeout: float = 45 * SECONDS
    # Reconnect backoff: full jitter between 0 and min(max, base * 2**attempt).
    # The upstream's `retry:` replaces `base` when it sends one.
    backoff_base: float = 1 * SECONDS
    backoff_max: float = 30 * SECONDS
    # A connection that stayed up this long resets the attempt counter.
    backoff_reset: float = 60 * SECONDS
    # SSE limits for what the app sends. 1 MiB per line / 4 MiB per event are far
    # above any sane SSE payload yet bound what one bad event can pin in memory.
    max_line_bytes: int = 1 * MiB
    max_event_bytes: int = 4 * MiB

    def __post_init__(self) -> None:
        _require(
            self.url.startswith(("http://", "https://")),
            "UpstreamConfig.url",
            "an http:// or https:// URL",
            self.url,
        )
        for name in ("connect_timeout", "idle_timeout", "backoff_base", "backoff_max"):
            _require(getattr(self, name) > 0, f"UpstreamConfig.{name}", "> 0", getattr(self, name))


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    path: str
    upstream: UpstreamConfig
    # A template route (`/jobs/{job}/progress`) serves one channel per key, each
    # with its own ring and upstream subscription; `key` bounds what a key may
    # be, and `max_channels` how many keys may be live at once (None = only the
    # global max_channels applies). Template routes are always lazy.
    key: KeyConfig = field(default_factory=KeyConfig)
    max_channels: int | None = None
    # Ring bounds: count, bytes and age together; an event is evicted when any is hit.
    # 1000 events covers a typical reconnect window (browsers retry after 3-5 s)
    # at up to ~200 events/s.
    buffer: int = 1000
    # 16 MiB bounds the ring's memory per route even with large events.
    buffer_bytes: int = 16 * MiB
    # Events older than this are not replayed (0 = no age bound). One hour
    # mirrors nchan's message_timeout default.
    buffer_age: float = 1 * 60 * MINUTES
    # Below the 29-60 s idle limits of API gateways, nginx (60 s) and ALBs (60 s).
    heartbeat: float = 15 * SECONDS
    # None: heartbeats are SSE comments (invisible to EventSource). A name: a
    # named event with empty data, for clients that must see liveness.
    heartbeat_event: str | None = None
    # `retry:` (ms) sent to each client when its stream opens. Browsers keep
    # the last `retry:` they saw for the EventSource's whole life, so every
    # stream starts with this one: a refusal's longer, jittered `retry:` must
    # not stick to the page. 3 s is Chromium's own default. None sends none.
    retry: int | None = 3000
    # "eager": subscribe at start, keep the ring warm. "lazy": subscribe on the
    # first client, unsubscribe `linger` seconds after the last one leaves.
    mode: Literal["eager", "lazy"] = "eager"
    linger: float = 30 * SECONDS
    start: StartConfig = field(default_factory=StartConfig)
    # After an unknown or evicted Last-Event-ID (and the `ssefan-gap` event):
    # "replay" sends everything still held, "live" goes straight to live.
    on_gap: Literal["replay", "live"] = "replay"
    # Per-route cap on concurrent streams; None = only the global cap applies.
    max_clients: int | None = None
    # Unsent bytes a client may fall behind before it is cut off (it then
    # reconnects with Last-Event-ID). 1 MiB is ~5000 typical 200-byte events.
    max_client_lag_bytes: int = 1 * MiB
    cors: CorsConfig | None = None
    # Forward-auth: ask the app who may listen before a stream opens.
    auth: AuthConfig | None = None
    # How a stream refused for a *temporary* reason (drain, max_clients, auth
    # unavailable) is answered. "retry": a short `200 text/event-stream` with a
    # jittered `retry:` and an `ssefan-retry` event, because an EventSource
    # that gets any non-200 closes for good (WHATWG HTML §9.2.2). "status": a
    # plain 503 with Retry-After, for SDKs and scripts that read statuses.
    refuse: Literal["retry", "status"] = "retry"
    # Refuse (404) rather than pass to the app a path that is this route's
    # path in another case or with encoded NUL/control bytes: an app that
    # routes case-insensitively would serve its own stream past the fan-out
    # and past forward-auth.
    protect_variants: bool = True

    def __post_init__(self) -> None:
        _require(
            self.path.startswith("/"), "RouteConfig.path", 'a path starting with "/"', self.path
        )
        _require(self.buffer >= 1, "RouteConfig.buffer", ">= 1", self.buffer)
        _require(self.heartbeat > 0, "RouteConfig.heartbeat", "> 0", self.heartbeat)
        for name in ("max_clients", "max_channels"):
            value = getattr(self, name)
            _require(value is None or value >= 1, f"RouteConfig.{name}", "None or >= 1", value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSConfig:
    """TLS for clients on the main listener. The files are read at start and
    again on every reload (SIGHUP), which is how a certificate is rotated."""

    # PEM files: the certificate chain (leaf first) and its unencrypted key.
    cert: str
    key: str
    # TLS 1.2 is RFC 9113 §9.2's floor for HTTP/2 and what every browser
    # still in support speaks; "1.3" refuses older clients.
    min_version: Literal["1.2", "1.3"] = "1.2"
    # Offered by ALPN, in the server's order of preference; a client that
    # offers no ALPN gets HTTP/1.1.
    alpn: tuple[str, ...] = ("h2", "http/1.1")

    def __post_init__(self) -> None:
        _require(
            self.min_version in ("1.2", "1.3"),
            "TLSConfig.min_version",
            '"1.2" or "1.3"',
            self.min_version,
        )
        _require(
            bool(self.alpn)
            and set(self.alpn) <= {"h2", "http/1.1"}
            and len(set(self.alpn)) == len(self.alpn),
            "TLSConfig.alpn",
            'a non-empty tuple of distinct "h2" and "http/1.1"',
            self.alpn,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Http2Config:
    """HTTP/2 for clients (over TLS, when ALPN picks h2): the per-connection limits."""

    # SETTINGS_MAX_CONCURRENT_STREAMS: streams one connection may have open,
    # each an EventSource or a request. RFC 9113 §6.5.2 recommends at least
    # 100; every browser opens streams up to what the server advertises.
    max_concurrent_streams: int = 100

    def __post_init__(self) -> None:
        _require(
            1 <= self.max_concurrent_streams <= 10_000,
            "Http2Config.max_concurrent_streams",
            "from 1 to 10000",
            self.max_concurrent_streams,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    host: str
    port: int
    # None: plain HTTP. The admin listener never has TLS.
    tls: TLSConfig | None = None
    # Served when TLS's ALPN picks h2 (browsers speak HTTP/2 only over TLS).
    http2: Http2Config = field(default_factory=Http2Config)

    def __post_init__(self) -> None:
        _require(0 <= self.port <= 65535, "ListenConfig.port", "from 0 to 65535", self.port)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    """Forward-auth for a stream route: the app decides who may listen."""

    # GET here with the client's credentials; 2xx admits, 401/403 are passed on
    # to the client, anything else (or no answer) is a 503.
    url: str
    # Client request headers copied to the auth request (lowercase names).
    forward: tuple[str, ...] = ("cookie", "authorization")
    # How long a decision is cached per credential (0 = ask every time). 30 s
    # turns a reconnect storm into one auth call per user, yet a revoked user
    # is shut out within half a minute.
    cache: float = 30 * SECONDS
    # The auth endpoint's time to answer before the client gets a 503.
    timeout: float = 5 * SECONDS
    # EventSource can't send headers: a query parameter (e.g. "token") whose
    # value is sent to the auth endpoint as `token_header: token_scheme <value>`.
    token_param: str | None = None
    token_header: str = "authorization"
    token_scheme: str = "Bearer"
    # Re-ask for open streams this often and end those no longer admitted
    # (None = decide once, at connect).
    revalidate: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyConfig:
    """Pass-through of non-stream requests to `app`."""

    # The app is on the same host: a connect that takes 5 s means it is down.
    connect_timeout: float = 5 * SECONDS
    # From the request sent to the response head; generous for slow endpoints.
    first_byte_timeout: float = 60 * SECONDS
    # Silence on a response (or request) body in progress. Streaming responses
    # that go quiet longer than this are cut: keep it above their heartbeats.
    idle_timeout: float = 120 * SECONDS
    # Request bodies over this get 413 (checked on Content-Length and while
    # streaming chunked uploads). 10 MiB is nginx's order of magnitude (1 MiB)
    # times ten, for apps that take uploads.
    max_body_bytes: int = 10 * MiB
    # Idle keep-alive connections kept open to the app for reuse.
    pool_size: int = 32
    # An idle pooled connection older than this is closed (apps often time out
    # idle keep-alive at 60-75 s; closing first avoids racing their close).
    pool_idle_timeout: float = 30 * SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin listener: /healthz, /readyz, /metrics and a status page."""

    listen: ListenConfig


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: ListenConfig
    # Origin (scheme://host:port) of the app that non-stream requests go to.
    app: str | None = None
    routes: tuple[RouteConfig, ...] = ()
    # Global cap on concurrent streams across routes. Each stream costs a socket
    # and a few KiB; 100k matches the LimitNOFILE the systemd unit sets.
    max_clients: int = 100_000
    # Template routes: live keys (channels) across all routes. A new key past it
    # gets the temporary refusal; live channels are never evicted to make room.
    # 10k idle channels cost ~100 MiB (each holds an upstream connection).
    max_channels: int = 10_000
    # Every ring's bytes together. When reached, the oldest events of the rings
    # holding most are evicted first; the newest event of every ring stays.
    ring_bytes_total: int = 256 * MiB
    # Request line + headers. 16 KiB is h11's default and nginx's
    # large_client_header_buffers-ish; browsers' EventSource requests are < 2 KiB.
    max_header_bytes: int = 16 * KiB
    # Time a client has to send a complete request head (slowloris guard), and
    # how long an idle keep-alive connection is kept.
    header_timeout: float = 10 * SECONDS
    keepalive_timeout: float = 5 * SECONDS
    # Pass-through settings (used when `app` is set).
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    # Peers (IPs or CIDRs, e.g. a front load balancer) whose X-Forwarded-For /
    # -Proto / -Host are kept and appended to; from anyone else they are replaced.
    trusted_proxies: tuple[str, ...] = ()
    # Off unless set: health, readiness, Prometheus metrics, live status page.
    admin: AdminConfig | None = None
    # Processes accepting on one port (SO_REUSEPORT), each with its own upstream
    # subscription. YAML "auto" = the CPU count.
    workers: int = 1
    # On SIGTERM, client streams are ended spread over this window (jittered) so
    # thousands of browsers don't reconnect to the next instance in one second.
    drain_window: float = 10 * SECONDS
    # Hard deadline for the whole shutdown; systemd's TimeoutStopSec is above it.
    shutdown_timeout: float = 30 * SECONDS
    # READY=1 goes to systemd once every eager upstream streams, or after this.
    ready_timeout: float = 10 * SECONDS
    # Where each channel's ring is kept across restarts (a snapshot at a clean
    # stop, a journal written every state_sync between). None: rings start
    # empty after a restart. The loader's default is $STATE_DIRECTORY, which
    # systemd sets for the unit's StateDirectory=.
    state_dir: str | None = None
    # How often the journals are written: what a SIGKILL can lose at most.
    # 1 s: one write() per channel per second, never one per event.
    state_sync: float = 1 * SECONDS
    # The file the config came from, for messages; "<string>" when built in code.
    source: str = "<string>"

    def __post_init__(self) -> None:
        for name in ("max_clients", "max_channels", "workers"):
            _require(getattr(self, name) >= 1, f"Config.{name}", ">= 1", getattr(self, name))


def _require(ok: bool, field_name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{field_name}: expected {expected}, got {got!r}")


# Defaults come from the dataclasses themselves, so they are written down once.
_UPSTREAM_DEFAULTS = UpstreamConfig(url="http://127.0.0.1")
_ROUTE_DEFAULTS = RouteConfig(path="/", upstream=_UPSTREAM_DEFAULTS)
_CORS_DEFAULTS = CorsConfig(allow_origins=())
_KEY_DEFAULTS = KeyConfig()
_AUTH_DEFAULTS = AuthConfig(url="http://127.0.0.1")
_PROXY_DEFAULTS = ProxyConfig()
_CONFIG_DEFAULTS = Config(listen=ListenConfig(host="127.0.0.1", port=0))
