"""YAML configuration -> frozen, typed values, validated with key-path errors.

The dataclasses below are the contract the rest of ssefan is written against:
every duration is a float in seconds, every size an int in bytes.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import SplitResult, urlsplit

import yaml
from yaml.reader import ReaderError

from ssefan.core.paths import routing_path

SECONDS = 1.0
MINUTES = 60 * SECONDS
KiB = 1024
MiB = 1024 * KiB


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


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig:
    path: str
    upstream: UpstreamConfig
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


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    host: str
    port: int


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
    # The file the config came from, for messages; "<string>" when built in code.
    source: str = "<string>"


# ---------------------------------------------------------------------------
# Loading: YAML text -> Config. Every problem is collected and reported at
# once, each as "<file>:<line>: <key path>: <what was expected>, got <what was
# there>", the line being the key's (YAML syntax errors: "<file>: line L, column C").
# ---------------------------------------------------------------------------

_T = TypeVar("_T")

_Mode = Literal["eager", "lazy"]
_OnGap = Literal["replay", "live"]
_MODES: tuple[_Mode, ...] = ("eager", "lazy")
_ON_GAP: tuple[_OnGap, ...] = ("replay", "live")
_REFUSE: tuple[Literal["retry", "status"], ...] = ("retry", "status")

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

# Defaults come from the dataclasses themselves, so they are written down once.
_UPSTREAM_DEFAULTS = UpstreamConfig(url="http://127.0.0.1")
_ROUTE_DEFAULTS = RouteConfig(path="/", upstream=_UPSTREAM_DEFAULTS)
_CORS_DEFAULTS = CorsConfig(allow_origins=())
_AUTH_DEFAULTS = AuthConfig(url="http://127.0.0.1")
_PROXY_DEFAULTS = ProxyConfig()
_CONFIG_DEFAULTS = Config(listen=ListenConfig(host="127.0.0.1", port=0))

_DURATION_UNITS = {"ms": 0.001, "s": SECONDS, "m": MINUTES, "h": 60 * MINUTES}
_DURATION = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|s|m|h)")
_DURATION_EXPECTED = 'a duration like "15s", "500ms", "2m" or "1h" (a plain number means seconds)'
# Binary units (what the code's defaults use) and decimal ones, each meaning
# exactly what the standard says: 1KiB = 1024 bytes, 1kB = 1KB = 1000 bytes.
_SIZE_UNITS = {
    "B": 1,
    "KiB": KiB,
    "MiB": MiB,
    "GiB": 1024 * MiB,
    "kB": 1000,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_SIZE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>[A-Za-z]+)")
_SIZE_EXPECTED = 'a size like "64KiB", "8MiB", "1GiB" or a number of bytes'

# RFC 9110 §5.6.2: a header name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9110 §5.5 field value, ASCII only, no leading/trailing whitespace (h11
# rejects those too, and would fail every reconnect at runtime instead).
_HEADER_VALUE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?")
# Headers the upstream client writes itself; a second copy from the config would
# be sent as a duplicate (or, for framing headers, corrupt the request).
_MANAGED_HEADERS = {
    "host": "it comes from the upstream URL",
    "last-event-id": "ssefan sends it itself to resume the stream",
    "accept": "ssefan asks for text/event-stream itself",
    "accept-encoding": "ssefan asks for identity itself (it cannot parse a compressed stream)",
    "cache-control": "ssefan sends no-cache itself",
    "user-agent": "ssefan identifies itself",
    "connection": "it is a hop-by-hop header ssefan manages",
    "keep-alive": "it is a hop-by-hop header ssefan manages",
    "te": "it is a hop-by-hop header ssefan manages",
    "trailer": "it is a hop-by-hop header ssefan manages",
    "upgrade": "it is a hop-by-hop header ssefan manages",
    "content-length": "a GET request has no body",
    "transfer-encoding": "a GET request has no body",
}
# Headers that cannot be copied into (or set on) the auth request: it is a GET
# to auth.url that ssefan frames itself.
_AUTH_REFUSED_HEADERS = {
    "host": "the auth request's Host comes from auth.url",
    "connection": "it is a hop-by-hop header ssefan manages",
    "keep-alive": "it is a hop-by-hop header ssefan manages",
    "te": "it is a hop-by-hop header ssefan manages",
    "trailer": "it is a hop-by-hop header ssefan manages",
    "upgrade": "it is a hop-by-hop header ssefan manages",
    "content-length": "the auth request is a GET without a body",
    "transfer-encoding": "the auth request is a GET without a body",
}
# RFC 3986 unreserved characters: a query parameter name that needs no escaping.
_QUERY_NAME = re.compile(r"[A-Za-z0-9._~-]+")
# Query parameters the server reads as Last-Event-ID (server.LAST_EVENT_ID_PARAMS;
# not imported: config must not pull in the server stack).
_LAST_EVENT_ID_PARAMS = ("last_event_id", "lastEventId", "evs_last_event_id")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class ConfigError(ValueError):
    """The configuration is unusable. `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _BadValue(ValueError):
    """One value has the wrong type, form or range; the message says what was expected."""


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file. Raises ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError([f"{source}: cannot read the file: {reason}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"]
        ) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate YAML text; `source` names it in messages and becomes Config.source."""
    reader = _Reader(source)
    document = _parse_yaml(text, reader)
    config = _read_config(reader, document)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


def parse_duration(value: object) -> float:
    """`"15s"`, `"500ms"`, `"2m"`, `"1h"` or a number of seconds -> seconds.

    Raises ValueError saying what was expected.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise _BadValue(f"expected a duration of 0 or more, got {_show(value)}")
        return float(value)
    if isinstance(value, str) and value.strip().startswith("-"):
        raise _BadValue(f"expected a duration of 0 or more, got {_show(value)}")
    match = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _BadValue(f"expected {_DURATION_EXPECTED}, got {_show(value)}")
    return float(match["number"]) * _DURATION_UNITS[match["unit"]]


def parse_size(value: object) -> int:
    """`"64KiB"`, `"8MiB"`, `"1GiB"`, `"512B"`, `"10kB"` or a whole number of bytes -> bytes.

    Raises ValueError saying what was expected.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise _BadValue(f"expected a size of 0 or more, got {value}")
        return value
    if isinstance(value, str) and value.strip().startswith("-"):
        raise _BadValue(f"expected a size of 0 or more, got {_show(value)}")
    match = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise _BadValue(f"expected {_SIZE_EXPECTED}, got {_show(value)}")
    unit = match["unit"]
    if unit not in _SIZE_UNITS:
        hint = _size_unit_hint(match["number"], unit)
        raise _BadValue(f"expected {_SIZE_EXPECTED}, got {_show(value)}{hint}")
    size = Fraction(match["number"]) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise _BadValue(f"expected a whole number of bytes, got {_show(value)}")
    return int(size)


def _size_unit_hint(number: str, unit: str) -> str:
    lowered = unit.lower()
    for known in _SIZE_UNITS:
        if known.lower() == lowered or known.lower().startswith(lowered):
            return f'; did you mean "{number}{known}"?'
    return f"; units: {', '.join(_SIZE_UNITS)}"


# --- YAML -------------------------------------------------------------------


class _Mapping(dict[object, object]):
    """A YAML mapping that remembers the line (from 1) of itself and of each key,
    so a problem found while reading can name the line to edit."""

    __slots__ = ("key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[object, int] = {}


class _Sequence(list[object]):
    """A YAML sequence that remembers the line (from 1) of itself and of each item."""

    __slots__ = ("item_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader (same safety as yaml.safe_load) that also notes duplicate
    keys, which plain YAML loading resolves silently by keeping the last one, and
    builds mappings and sequences that remember their lines (_Mapping, _Sequence)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, yaml.Mark, yaml.Mark]] = []

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        first_seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            # `<<` merge keys may legitimately be overridden; only compare plain scalars.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            identity = (key_node.tag, key_node.value)
            if identity in first_seen:
                self.duplicates.append((key_node.value, key_node.start_mark, first_seen[identity]))
            else:
                first_seen[identity] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_marked_mapping(self, node: yaml.MappingNode) -> Iterator[_Mapping]:
        # A generator, like SafeConstructor.construct_yaml_map: the empty mapping
        # is handed out first so that aliases to it (even recursive ones) resolve.
        data = _Mapping(node.start_mark.line + 1)
        yield data
        data.update(self.construct_mapping(node))
        # construct_mapping has flattened `<<` merges into node.value, merged keys
        # first: the last node of each key is the one whose value the dict kept.
        for key_node, _ in node.value:
            data.key_lines[self.construct_object(key_node)] = key_node.start_mark.line + 1

    def construct_marked_sequence(self, node: yaml.SequenceNode) -> Iterator[_Sequence]:
        data = _Sequence(node.start_mark.line + 1)
        yield data
        data.extend(self.construct_sequence(node))
        data.item_lines.extend(item.start_mark.line + 1 for item in node.value)


_ConfigLoader.add_constructor("tag:yaml.org,2002:map", _ConfigLoader.construct_marked_mapping)
_ConfigLoader.add_constructor("tag:yaml.org,2002:seq", _ConfigLoader.construct_marked_sequence)


def _parse_yaml(text: str, reader: _Reader) -> object:
    """The YAML document; a syntax error ends reading, a duplicate key is reported."""
    loader: _ConfigLoader | None = None
    try:
        # The constructor already reads the text (and refuses control characters).
        loader = _ConfigLoader(text)
        document: object = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError([_yaml_problem(err, reader.source, text)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    reader.document = document
    for key, mark, first in sorted(loader.duplicates, key=lambda dup: dup[1].index):
        reader.report_at(
            mark,
            f"duplicate key {_show(key)} (first at {_where(first)});"
            " YAML would silently keep only the last one, so remove one of them",
        )
    return document


def _where(mark: yaml.Mark) -> str:
    # yaml marks count from 0; editors count from 1.
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.YAMLError, source: str, text: str) -> str:
    if isinstance(err, ReaderError) and isinstance(err.position, int):
        return f"{source}: {_text_position(text, err.position)}: invalid YAML: " + (
            _explain_reader_error(err) or str(err.reason)
        )
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{source}: invalid YAML: {err}"
    mark = err.problem_mark
    explained = _explain_yaml(err, mark, text.splitlines())
    if explained is None:
        # Not one we know: PyYAML's own words, still with where it happened.
        explained = err.problem or ""
        if err.context and err.context_mark is not None and err.context_mark != mark:
            explained += f" ({err.context} that started at {_where(err.context_mark)})"
    return f"{source}: {_where(mark)}: invalid YAML: {explained}"


def _text_position(text: str, index: int) -> str:
    """`_where` for an index into the text (a ReaderError carries no Mark)."""
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _explain_reader_error(err: ReaderError) -> str | None:
    code = err.character if isinstance(err.character, int) else None
    if code is None:
        return None
    # YAML 1.1 §5.1: only printable characters may appear in a YAML stream.
    return (
        f"the control character U+{code:04X} cannot appear in YAML: delete it"
        f' (inside double quotes it may be written as an escape, e.g. "\\x{code:02x}")'
        if code < 0x100
        else f"the character U+{code:04X} cannot appear in YAML: delete it"
    )


# Tokens PyYAML names in "expected <block end>, but found X" when a line starts
# at an indentation that no open mapping or list has.
_LINE_START_TOKENS = (
    "'<block mapping start>'",
    "'<block sequence start>'",
    "'<scalar>'",
    "'?'",
    "'<alias>'",
    "'<anchor>'",
    "'<tag>'",
)
_INDENT_HINT = "indent each key of a mapping by the same number of spaces (no tabs)"


def _explain_yaml(err: yaml.MarkedYAMLError, mark: yaml.Mark, lines: list[str]) -> str | None:
    """PyYAML's complaint in plain words, with what to change; None if not a known one."""
    problem, context, start = err.problem or "", err.context or "", err.context_mark
    line = _line(lines, mark)
    started = f" at {_where(start)}" if start is not None else ""
    opening = _line(lines, start)[start.column : start.column + 1] if start is not None else ""
    if "'\\t'" in problem:
        return "a tab character: YAML does not allow tabs for indentation; indent with spaces"
    if re.match(r"\s*[\w-]+:\s*\[[0-9A-Fa-f:.]*\]:", line):
        return (
            'a value that starts with "[" is a list in YAML:'
            ' quote bracketed IPv6 addresses, e.g. listen: "[::1]:8080"'
        )
    if problem == "mapping values are not allowed here":
        return _explain_colon(mark, line, lines)
    if problem.startswith("expected <block end>, but found "):
        return _explain_block_end(problem, mark, line, lines, start)
    if context in ("while parsing a flow sequence", "while parsing a flow mapping"):
        kind, close = ("list", "]") if "sequence" in context else ("mapping", "}")
        if problem.endswith("'<stream end>'"):
            return (
                f'the {kind} opened with "{opening}"{started} is never closed:'
                f' end it with "{close}"'
            )
        return (
            f'the {kind} opened with "{opening}"{started} is not closed where expected:'
            f' separate its items with "," and end it with "{close}";'
            ' quote items that contain ": " or " #"'
        )
    if problem == "expected the node content, but found '<stream end>'":
        return (
            "the file ends where a value was expected:"
            ' close the "[" or "{" opened above, or finish the value'
        )
    if context == "while scanning a quoted scalar":
        return (
            f"the quoted value that starts with {opening}{started} has no closing {opening}:"
            f" add {opening} at the end of the value"
        )
    escape = re.fullmatch(r"found unknown escape character '(.*)'", problem)
    if escape:
        return (
            f'inside double quotes "\\" starts an escape and "\\{escape[1]}" is not one:'
            ' put the value in single quotes instead, or write each "\\" as "\\\\"'
        )
    if context in ("while scanning an alias", "while scanning an anchor"):
        sign, name = (
            ("*", "an alias (a reference to an anchor)")
            if "alias" in context
            else ("&", "an anchor")
        )
        return (
            f'"{sign}" at the start of a value makes it {name} in YAML:'
            f' quote the value, e.g. "{sign}"'
        )
    alias = re.fullmatch(r"found undefined alias '(.*)'", problem)
    if alias:
        return (
            f'"*{alias[1]}" refers to an anchor "&{alias[1]}" that is not defined above it:'
            f' define the anchor first, or quote the value if "*" is meant literally'
        )
    anchor = re.fullmatch(r"found duplicate anchor '(.*)'; first occurrence", context)
    if anchor:
        return (
            f'the anchor "&{anchor[1]}" is defined twice (first{started}):'
            " give each anchor its own name"
        )
    reserved = re.fullmatch(r"found character '(.)' that cannot start any token", problem)
    if reserved:
        return (
            f'a value cannot start with "{reserved[1]}" in YAML (it is reserved): quote the value'
        )
    if context == "while scanning a simple key" and start is not None:
        text = _line(lines, start).strip()
        return (
            f'line {start.line + 1} ({_show(text)}) has no ":" after its key:'
            ' write it as "key: value", or "key:" with the value indented on the lines below'
        )
    if context == "expected a single document in the stream":
        return 'a second YAML document starts here ("---"): keep one document in the file'
    tag = re.fullmatch(r"could not determine a constructor for the tag '(.*)'", problem)
    if tag:
        shown = tag[1].replace("tag:yaml.org,2002:", "!!")
        return (
            f"the tag {_show(shown)} asks for an object, not plain data, and ssefan reads"
            " plain data only (YAML safe loading): remove the tag"
        )
    if problem == "found unhashable key":
        return 'a list or mapping is used as a key: keys are plain names, like "path"'
    if context == "while scanning a block scalar":
        return (
            'only "+", "-" or an indentation digit may follow "|" or ">" on its line:'
            " start the text on the next line, or quote the value"
        )
    return None


def _line(lines: list[str], mark: yaml.Mark) -> str:
    # A mark may sit just past the last line (the end of the stream).
    return lines[mark.line] if mark.line < len(lines) else ""


def _key_column(line: str) -> int:
    """Where a line's key starts: after its indentation and any "- " list markers."""
    match = re.match(r"(?:[ ]*-[ ]+)*[ ]*", line)
    return match.end() if match else 0


def _line_above(lines: list[str], index: int) -> int | None:
    """The nearest line above `index` that holds something other than a comment."""
    for above in range(min(index, len(lines)) - 1, -1, -1):
        content = lines[above].strip()
        if content and not content.startswith("#"):
            return above
    return None


def _explain_colon(mark: yaml.Mark, line: str, lines: list[str]) -> str:
    # ": " where YAML is reading a value. Three usual causes: the value itself
    # holds ": "; the line is indented deeper than its key, so it continues the
    # value above; or the line above lacks its ":", so both are one text.
    before = line[: mark.column]
    if re.search(r":\s", before):
        key, _, value = line.strip().partition(": ")
        value = value.split(" #")[0].strip()
        quoted = f"'{value}'" if '"' in value else f'"{value}"'
        return (
            f'this value contains ": ", which YAML reads as the start of another key:'
            f" put the value in quotes, e.g. {key}: {quoted}"
        )
    above = _line_above(lines, mark.line)
    if above is not None and _key_column(line) > _key_column(lines[above]):
        return (
            f"this line is indented deeper than the key on line {above + 1}, so YAML reads it"
            f" as more of that key's value: {_INDENT_HINT}"
        )
    if above is not None and not re.search(r":(\s|$)", lines[above]):
        return (
            f'line {above + 1} has no ":" after its key, so YAML reads it and this line as'
            ' one text: write it as "key: value"'
        )
    return (
        f'a key (": ") is not allowed here: quote the value if it contains ": ", and {_INDENT_HINT}'
    )


def _explain_block_end(
    problem: str, mark: yaml.Mark, line: str, lines: list[str], start: yaml.Mark | None
) -> str | None:
    found = problem.removeprefix("expected <block end>, but found ")
    opened = _line(lines, start)[start.column :] if start is not None else ""
    if found == "'-'":
        if start is not None and re.match(r"-[^\s-]", opened):
            return (
                f"line {start.line + 1} starts with {_show(opened.split(':')[0])},"
                ' which YAML reads as a key: put a space after "-" to make it a list item'
            )
        return (
            'a list item ("- ") where a key was expected: a list must be the value of a key,'
            ' indented under "key:"'
        )
    at_line_start = mark.column in (len(line) - len(line.lstrip(" ")), _key_column(line))
    if found in _LINE_START_TOKENS and at_line_start:
        spaces = len(line) - len(line.lstrip(" "))
        return (
            f"the indentation of this line ({spaces} space{'' if spaces == 1 else 's'})"
            f" does not match the lines above it: {_INDENT_HINT}"
        )
    if found == "'<scalar>'" and re.search(r"[\"']\s*$", line[: mark.column]):
        return "text follows the closing quote of a value: put the whole value inside the quotes"
    if found in ("']'", "'}'"):
        bracket = found[1]
        return f'a "{bracket}" that closes nothing: remove it, or quote the value'
    return None


# --- reading sections ---------------------------------------------------------


# One step of a key path as _join and the list readers write it: `.key` (or a
# leading `key`), `["quoted key"]` (JSON), or `[index]`.
_PATH_STEP = re.compile(
    r'\.?(?P<key>[A-Za-z_][A-Za-z0-9_-]*)|\[(?P<index>[0-9]+)\]|\[(?P<quoted>"(?:[^"\\]|\\.)*")\]'
)


class _Reader:
    """Collects problems while the document is read, naming file, line and key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        # The parsed document, whose _Mapping/_Sequence values know their lines.
        self.document: object = None

    def report(self, path: str, message: str, *, at: str | None = None) -> None:
        """`source:line: path: message`; the line is that of `at` (default: `path`)."""
        line = self.line_of(path if at is None else at)
        where = self.source if line is None else f"{self.source}:{line}"
        self.problems.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def report_at(self, mark: yaml.Mark, message: str) -> None:
        """A problem at a place in the text rather than at a key path."""
        self.problems.append(f"{self.source}: {_where(mark)}: {message}")

    def line_of(self, path: str) -> int | None:
        """The line of the key or item at `path`; for one that is not in the file
        (a missing key), the line of the nearest enclosing key or item that is."""
        node = self.document
        line = node.line if isinstance(node, _Mapping | _Sequence) else None
        position = 0
        while position < len(path):
            step = _PATH_STEP.match(path, position)
            if step is None:
                break
            position = step.end()
            if isinstance(node, _Sequence) and step["index"] is not None:
                index = int(step["index"])
                if index >= len(node.item_lines):
                    break
                line, node = node.item_lines[index], node[index]
            elif isinstance(node, _Mapping) and step["index"] is None:
                found = _key_named(node, step["key"] or json.loads(step["quoted"]))
                if found is None:
                    break
                line, node = node.key_lines[found[0]], node[found[0]]
            else:
                break
        return line

    def section(
        self,
        raw: object,
        path: str,
        keys: tuple[str, ...],
        expected: str,
        misplaced: dict[str, str] | None = None,
    ) -> _Section | None:
        """The mapping at `path`, with unknown keys reported; None if not a mapping."""
        if not isinstance(raw, dict):
            self.report(path, f"expected {expected}, got {_show(raw)}")
            return None
        for key in raw:
            if key not in keys:
                self.report(_join(path, str(key)), _unknown_key(str(key), keys, misplaced or {}))
        return _Section(self, path, raw)


class _Section:
    """One YAML mapping being read: values are converted field by field, and a
    bad one is reported and replaced by its default so reading goes on."""

    def __init__(self, reader: _Reader, path: str, values: dict[object, object]) -> None:
        self.reader = reader
        self.path = path
        self.values = values

    def path_of(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, convert: Callable[[object], _T], default: _T) -> _T:
        if key not in self.values:
            return default
        try:
            return convert(self.values[key])
        except _BadValue as err:
            self.reader.report(self.path_of(key), str(err))
            return default

    def require(self, key: str, convert: Callable[[object], _T], expected: str) -> _T | None:
        if key not in self.values:
            self.reader.report(self.path_of(key), f"missing; expected {expected}")
            return None
        try:
            return convert(self.values[key])
        except _BadValue as err:
            self.reader.report(self.path_of(key), str(err))
            return None

    def nested(
        self, key: str, read: Callable[[_Reader, object, str], _T | None], default: _T
    ) -> _T:
        """A sub-section; absent or null means the default."""
        raw = self.values.get(key)
        if raw is None:
            return default
        value = read(self.reader, raw, self.path_of(key))
        return default if value is None else value


def _key_named(mapping: _Mapping, name: str) -> tuple[object] | None:
    """The key _join wrote as `name` (it writes keys with str(): `8080:` is "8080"),
    in a 1-tuple so that a null key is told apart from no key."""
    if name in mapping.key_lines:
        return (name,)
    return next(((key,) for key in mapping.key_lines if str(key) == name), None)


def _join(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key, ensure_ascii=False)}]"
    return f"{path}.{key}" if path else key


def _unknown_key(key: str, keys: tuple[str, ...], misplaced: dict[str, str]) -> str:
    if key in misplaced:
        return f"unknown key here; {misplaced[key]}"
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return f"unknown key; expected one of: {', '.join(keys)}"


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


def _show(value: object) -> str:
    """A value as it appeared in the YAML, short enough for a one-line message."""
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return json.dumps(shown, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return str(value)


def _kind(value: object) -> str:
    """A value's type only, for values that may be secrets."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if value is None:
        return "null"
    if isinstance(value, str):
        return "a string"
    return _show(value) if isinstance(value, list | dict) else f"a {type(value).__name__}"


# --- the document -------------------------------------------------------------


def _read_config(reader: _Reader, raw: object) -> Config | None:
    if raw is None:
        reader.report("", "the file is empty; expected a mapping with at least listen and routes")
        return None
    section = reader.section(
        raw, "", _CONFIG_KEYS, "a mapping of settings (listen, app, routes, ...)", _MISPLACED_AT_TOP
    )
    if section is None:
        return None
    d = _CONFIG_DEFAULTS
    listen = section.require("listen", _listen, 'the address to serve on, like "127.0.0.1:8080"')
    app = section.get("app", _optional(_app_origin), d.app)
    has_app = section.values.get("app") is not None
    routes = _read_routes(reader, section.values.get("routes"), has_app)
    admin = section.nested("admin", _read_admin, d.admin)
    config = Config(
        listen=listen or d.listen,
        app=app,
        routes=routes or (),
        max_clients=section.get("max_clients", _integer(minimum=1), d.max_clients),
        max_header_bytes=section.get("max_header_bytes", _size(), d.max_header_bytes),
        header_timeout=section.get("header_timeout", _duration(positive=True), d.header_timeout),
        keepalive_timeout=section.get("keepalive_timeout", _duration(), d.keepalive_timeout),
        proxy=section.nested("proxy", _read_proxy, d.proxy),
        trusted_proxies=section.nested("trusted_proxies", _read_networks, d.trusted_proxies),
        admin=admin,
        workers=section.get("workers", _workers, d.workers),
        drain_window=section.get("drain_window", _duration(), d.drain_window),
        shutdown_timeout=section.get(
            "shutdown_timeout", _duration(positive=True), d.shutdown_timeout
        ),
        ready_timeout=section.get("ready_timeout", _duration(positive=True), d.ready_timeout),
        source=reader.source,
    )
    _check_shutdown(reader, section, config)
    if listen is not None and admin is not None:
        _check_admin_listen(reader, listen, admin.listen)
    return None if listen is None or routes is None else config


def _check_shutdown(reader: _Reader, section: _Section, config: Config) -> None:
    if config.shutdown_timeout <= config.drain_window:
        reader.report(
            section.path_of("shutdown_timeout"),
            f"expected more than drain_window ({_format_duration(config.drain_window)}),"
            f" got {_format_duration(config.shutdown_timeout)}:"
            " the streams must be drained before the deadline",
            # An unset shutdown_timeout is the default: the line to change is drain_window's.
            at=section.path_of(_written("shutdown_timeout", section, "drain_window")),
        )


def _read_proxy(reader: _Reader, raw: object, path: str) -> ProxyConfig | None:
    section = reader.section(raw, path, _PROXY_KEYS, "a mapping of pass-through settings")
    if section is None:
        return None
    d = _PROXY_DEFAULTS
    return ProxyConfig(
        connect_timeout=section.get("connect_timeout", _duration(positive=True), d.connect_timeout),
        first_byte_timeout=section.get(
            "first_byte_timeout", _duration(positive=True), d.first_byte_timeout
        ),
        idle_timeout=section.get("idle_timeout", _duration(positive=True), d.idle_timeout),
        max_body_bytes=section.get("max_body_bytes", _size(), d.max_body_bytes),
        pool_size=section.get("pool_size", _integer(minimum=0), d.pool_size),
        pool_idle_timeout=section.get(
            "pool_idle_timeout", _duration(positive=True), d.pool_idle_timeout
        ),
    )


def _read_networks(reader: _Reader, raw: object, path: str) -> tuple[str, ...] | None:
    if not isinstance(raw, list):
        reader.report(
            path,
            'expected a list of IP addresses or CIDRs like ["10.0.0.0/8", "127.0.0.1"],'
            f" got {_show(raw)}",
        )
        return None
    networks: list[str] = []
    first_index: dict[str, int] = {}
    for index, item in enumerate(raw):
        try:
            network = _network(item)
        except _BadValue as err:
            reader.report(f"{path}[{index}]", str(err))
            continue
        if network in first_index:
            reader.report(
                f"{path}[{index}]",
                f"{_show(network)} is already listed as {path}[{first_index[network]}]; keep one",
            )
            continue
        first_index[network] = index
        networks.append(network)
    return tuple(networks) if len(networks) == len(raw) else None


def _read_admin(reader: _Reader, raw: object, path: str) -> AdminConfig | None:
    section = reader.section(
        raw, path, _ADMIN_KEYS, 'a mapping with listen, like {listen: "127.0.0.1:9090"}'
    )
    if section is None:
        return None
    listen = section.require(
        "listen", _listen, 'the address for the admin endpoints, like "127.0.0.1:9090"'
    )
    return None if listen is None else AdminConfig(listen=listen)


def _check_admin_listen(reader: _Reader, main: ListenConfig, admin: ListenConfig) -> None:
    if main.port == 0 or admin.port != main.port:
        return
    wildcards = ("0.0.0.0", "::")
    if admin.host == main.host:
        clash = "is the same address as listen"
    elif admin.host in wildcards or main.host in wildcards:
        clash = f"overlaps listen ({_format_listen(main)})"
    else:
        return
    reader.report(
        "admin.listen",
        f"{_format_listen(admin)} {clash}; give the admin endpoints a port of their own",
    )


def _format_listen(listen: ListenConfig) -> str:
    host = f"[{listen.host}]" if ":" in listen.host else listen.host
    return f"{host}:{listen.port}"


def _read_routes(reader: _Reader, raw: object, has_app: bool) -> tuple[RouteConfig, ...] | None:
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        reader.report("routes", f"expected a list of routes (- path: ...), got {_show(raw)}")
        return None
    if not raw and not has_app:
        reader.report(
            "routes",
            "no routes and no app: add at least one route,"
            " or set app to only pass requests through",
        )
    routes = [_read_route(reader, item, f"routes[{index}]") for index, item in enumerate(raw)]
    _check_unique_paths(reader, raw)
    present = [route for route in routes if route is not None]
    return tuple(present) if len(present) == len(routes) else None


def _check_unique_paths(reader: _Reader, items: list[object]) -> None:
    # Compared in routing form: requests for "/events/" or "/%65vents" are
    # served by the "/events" route, so two routes that differ only by such
    # spellings could never both be reached.
    first_index: dict[str, int] = {}
    for index, item in enumerate(items):
        path = item.get("path") if isinstance(item, dict) else None
        if not isinstance(path, str):
            continue
        form = routing_path(path)
        if form not in first_index:
            first_index[form] = index
            continue
        first = first_index[form]
        if path == _route_path_of(items[first]):
            reason = f"{_show(path)} is already the path of routes[{first}]"
        else:
            reason = (
                f"{_show(path)} is the same route as routes[{first}].path"
                f" {_show(_route_path_of(items[first]))} (requests are matched after"
                ' normalising "/", "//", "." and percent-escapes)'
            )
        reader.report(f"routes[{index}].path", f"{reason}; each path serves one stream")


def _route_path_of(item: object) -> object:
    return item.get("path") if isinstance(item, dict) else None


def _read_route(reader: _Reader, raw: object, path: str) -> RouteConfig | None:
    section = reader.section(
        raw, path, _ROUTE_KEYS, "a mapping with at least path and upstream", _MISPLACED_IN_ROUTE
    )
    if section is None:
        return None
    d = _ROUTE_DEFAULTS
    route_path = section.require("path", _route_path, 'the path clients request, like "/events"')
    upstream = _read_required_upstream(section)
    route = RouteConfig(
        path=route_path or d.path,
        upstream=upstream or d.upstream,
        buffer=section.get("buffer", _integer(minimum=1), d.buffer),
        buffer_bytes=section.get("buffer_bytes", _size(), d.buffer_bytes),
        buffer_age=section.get("buffer_age", _duration(), d.buffer_age),
        heartbeat=section.get("heartbeat", _duration(positive=True), d.heartbeat),
        heartbeat_event=section.get("heartbeat_event", _optional(_event_name), d.heartbeat_event),
        retry=section.get("retry", _optional(_retry_ms), d.retry),
        mode=section.get("mode", _choice(_MODES), d.mode),
        linger=section.get("linger", _duration(), d.linger),
        start=section.nested("start", _read_start, d.start),
        on_gap=section.get("on_gap", _choice(_ON_GAP), d.on_gap),
        max_clients=section.get("max_clients", _optional(_integer(minimum=1)), d.max_clients),
        max_client_lag_bytes=section.get("max_client_lag_bytes", _size(), d.max_client_lag_bytes),
        cors=section.nested("cors", _read_cors, d.cors),
        auth=section.nested("auth", _read_auth, d.auth),
        refuse=section.get("refuse", _choice(_REFUSE), d.refuse),
        protect_variants=section.get("protect_variants", _boolean, d.protect_variants),
    )
    _check_start_fits(reader, section.path_of("start"), route)
    return None if route_path is None or upstream is None else route


def _read_required_upstream(section: _Section) -> UpstreamConfig | None:
    path = section.path_of("upstream")
    if "upstream" not in section.values:
        section.reader.report(
            path,
            'missing; expected the URL of the app\'s stream, like "http://127.0.0.1:8000/events"',
        )
        return None
    return _read_upstream(section.reader, section.values["upstream"], path)


def _read_upstream(reader: _Reader, raw: object, path: str) -> UpstreamConfig | None:
    if isinstance(raw, str):
        try:
            return UpstreamConfig(url=_upstream_url(raw))
        except _BadValue as err:
            reader.report(path, str(err))
            return None
    section = reader.section(
        raw,
        path,
        _UPSTREAM_KEYS,
        'a URL like "http://127.0.0.1:8000/events" or a mapping with url (and headers, ...)',
    )
    if section is None:
        return None
    d = _UPSTREAM_DEFAULTS
    url = section.require(
        "url", _upstream_url, 'the URL of the app\'s stream, like "http://127.0.0.1:8000/events"'
    )
    upstream = UpstreamConfig(
        url=url or d.url,
        headers=section.nested("headers", _read_headers, d.headers),
        connect_timeout=section.get("connect_timeout", _duration(positive=True), d.connect_timeout),
        idle_timeout=section.get("idle_timeout", _duration(positive=True), d.idle_timeout),
        backoff_base=section.get("backoff_base", _duration(positive=True), d.backoff_base),
        backoff_max=section.get("backoff_max", _duration(positive=True), d.backoff_max),
        backoff_reset=section.get("backoff_reset", _duration(), d.backoff_reset),
        max_line_bytes=section.get("max_line_bytes", _size(), d.max_line_bytes),
        max_event_bytes=section.get("max_event_bytes", _size(), d.max_event_bytes),
    )
    _check_upstream_limits(reader, section, upstream)
    return None if url is None else upstream


def _check_upstream_limits(reader: _Reader, section: _Section, upstream: UpstreamConfig) -> None:
    if upstream.backoff_max < upstream.backoff_base:
        reader.report(
            section.path_of("backoff_max"),
            f"expected at least backoff_base ({_format_duration(upstream.backoff_base)}),"
            f" got {_format_duration(upstream.backoff_max)}",
            at=section.path_of(_written("backoff_max", section, "backoff_base")),
        )
    if upstream.max_line_bytes > upstream.max_event_bytes:
        reader.report(
            section.path_of("max_line_bytes"),
            f"expected at most max_event_bytes ({_format_size(upstream.max_event_bytes)}),"
            f" got {_format_size(upstream.max_line_bytes)}: a line is part of an event",
            at=section.path_of(_written("max_line_bytes", section, "max_event_bytes")),
        )


def _written(key: str, section: _Section, other: str) -> str:
    """`key` if the file sets it, else `other`: the line a cross-check points at."""
    return key if key in section.values else other


def _read_headers(reader: _Reader, raw: object, path: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(raw, dict):
        reader.report(
            path,
            f'expected a mapping of header names to values, like {{Authorization: "Bearer ..."}},'
            f" got {_kind(raw)}",
        )
        return None
    headers: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for name, value in raw.items():
        key_path = _join(path, str(name))
        problem = _header_name_problem(name, seen) or _header_value_problem(value)
        if problem:
            reader.report(key_path, problem)
            continue
        name, value = str(name), str(value)
        seen[name.lower()] = name
        headers.append((name, value))
    return tuple(headers) if len(headers) == len(raw) else None


def _header_name_problem(name: object, seen: dict[str, str]) -> str | None:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        return (
            "not a valid HTTP header name;"
            " use letters, digits and !#$%&'*+-.^_`|~ only (RFC 9110 §5.6.2)"
        )
    reason = _MANAGED_HEADERS.get(name.lower())
    if reason is not None:
        return f"{name} cannot be set here: {reason}"
    if name.lower() in seen:
        return f"repeats {seen[name.lower()]} (header names ignore case); keep one"
    return None


def _header_value_problem(value: object) -> str | None:
    # Header values are often secrets: describe them, never echo them.
    if not isinstance(value, str):
        return f"expected a string value, got {_kind(value)}; put the value in quotes"
    if any(char in value for char in "\r\n\0"):
        return "the value must not contain CR, LF or NUL (value not shown: it may be a secret)"
    if not _HEADER_VALUE.fullmatch(value):
        return (
            "the value must be printable ASCII without leading or trailing spaces"
            " (value not shown: it may be a secret)"
        )
    return None


_START_EXPECTED = '"live", {events: N} or {age: DURATION}'


def _read_start(reader: _Reader, raw: object, path: str) -> StartConfig | None:
    if raw == "live":
        return StartConfig(kind="live")
    if isinstance(raw, str):
        reader.report(path, f"expected {_START_EXPECTED}, got {_show(raw)}{_start_hint(raw)}")
        return None
    section = reader.section(raw, path, _START_KEYS, _START_EXPECTED)
    if section is None:
        return None
    given = [key for key in _START_KEYS if key in section.values]
    if len(given) > 1 or not section.values:
        reader.report(path, "expected exactly one of events or age")
    if len(given) != 1:
        return None
    if given == ["events"]:
        count = section.get("events", _integer(minimum=1), None)
        return None if count is None else StartConfig(kind="events", count=count)
    age = section.get("age", _duration(positive=True), None)
    return None if age is None else StartConfig(kind="age", age=age)


def _start_hint(word: str) -> str:
    # `start: events` (the key written as the value) or a mistyped "live".
    close = difflib.get_close_matches(word, ("live", *_START_KEYS), n=1)
    if not close:
        return ""
    if close[0] == "live":
        return '; did you mean "live"?'
    return f"; did you mean {{{close[0]}: {'N' if close[0] == 'events' else 'DURATION'}}}?"


def _check_start_fits(reader: _Reader, path: str, route: RouteConfig) -> None:
    start, buffer, buffer_age = route.start, route.buffer, route.buffer_age
    if start.kind == "events" and start.count > buffer:
        reader.report(
            f"{path}.events",
            f"expected at most buffer ({buffer}) events, got {start.count}:"
            " the ring never holds more; raise buffer or start with fewer",
        )
    if start.kind == "age" and buffer_age > 0 and start.age > buffer_age:
        reader.report(
            f"{path}.age",
            f"expected at most buffer_age ({_format_duration(buffer_age)}),"
            f" got {_format_duration(start.age)}: older events are already evicted",
        )


def _read_cors(reader: _Reader, raw: object, path: str) -> CorsConfig | None:
    section = reader.section(raw, path, _CORS_KEYS, "a mapping with allow_origins")
    if section is None:
        return None
    d = _CORS_DEFAULTS
    origins = _read_origins(reader, section)
    cors = CorsConfig(
        allow_origins=origins or (),
        allow_credentials=section.get("allow_credentials", _boolean, d.allow_credentials),
        max_age=section.get("max_age", _duration(), d.max_age),
    )
    if "*" in cors.allow_origins and cors.allow_credentials:
        reader.report(
            path,
            'allow_origins ["*"] with allow_credentials: true:'
            " browsers reject credentials with a wildcard origin; list the origins",
        )
    return None if origins is None else cors


def _read_origins(reader: _Reader, section: _Section) -> tuple[str, ...] | None:
    path = section.path_of("allow_origins")
    expected = 'expected a list of origins like ["https://app.example.com"] or ["*"]'
    raw = section.values.get("allow_origins")
    if "allow_origins" not in section.values:
        reader.report(path, f"missing; {expected}")
        return None
    if not isinstance(raw, list) or not raw:
        reader.report(path, f"{expected}, got {_show(raw) if raw != [] else 'an empty list'}")
        return None
    if "*" in raw and len(raw) > 1:
        reader.report(path, '"*" already allows every origin; use ["*"] alone or list origins')
        return None
    origins: list[str] = []
    for index, item in enumerate(raw):
        try:
            origins.append(_origin(item))
        except _BadValue as err:
            reader.report(f"{path}[{index}]", str(err))
    return tuple(origins) if len(origins) == len(raw) else None


def _read_auth(reader: _Reader, raw: object, path: str) -> AuthConfig | None:
    section = reader.section(
        raw,
        path,
        _AUTH_KEYS,
        'a mapping with url, like {url: "http://127.0.0.1:8000/auth"}',
    )
    if section is None:
        return None
    d = _AUTH_DEFAULTS
    url = section.require(
        "url", _auth_url, 'the URL that decides who may listen, like "http://127.0.0.1:8000/auth"'
    )
    auth = AuthConfig(
        url=url or d.url,
        forward=section.nested("forward", _read_forward, d.forward),
        cache=section.get("cache", _duration(), d.cache),
        timeout=section.get("timeout", _duration(positive=True), d.timeout),
        token_param=section.get("token_param", _optional(_token_param), d.token_param),
        token_header=section.get("token_header", _auth_header_name, d.token_header),
        token_scheme=section.get("token_scheme", _token_scheme, d.token_scheme),
        revalidate=section.get("revalidate", _optional(_duration(positive=True)), d.revalidate),
    )
    return None if url is None else auth


def _read_forward(reader: _Reader, raw: object, path: str) -> tuple[str, ...] | None:
    if not isinstance(raw, list):
        reader.report(
            path, f"expected a list of header names like [cookie, authorization], got {_show(raw)}"
        )
        return None
    names: list[str] = []
    for index, item in enumerate(raw):
        try:
            name = _auth_header_name(item)
        except _BadValue as err:
            reader.report(f"{path}[{index}]", str(err))
            continue
        if name in names:
            reader.report(
                f"{path}[{index}]", f"repeats {name} (header names ignore case); keep one"
            )
            continue
        names.append(name)
    return tuple(names) if len(names) == len(raw) else None


# --- single values --------------------------------------------------------------


def _optional(convert: Callable[[object], _T]) -> Callable[[object], _T | None]:
    def convert_optional(value: object) -> _T | None:
        return None if value is None else convert(value)

    return convert_optional


def _integer(*, minimum: int) -> Callable[[object], int]:
    def convert_integer(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _BadValue(f"expected an integer >= {minimum}, got {_show(value)}")
        return value

    return convert_integer


def _duration(*, positive: bool = False) -> Callable[[object], float]:
    def convert_duration(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise _BadValue(f"expected a duration greater than 0, got {_show(value)}")
        return seconds

    return convert_duration


def _size() -> Callable[[object], int]:
    def convert_size(value: object) -> int:
        size = parse_size(value)
        if size == 0:
            raise _BadValue(f"expected a size greater than 0, got {_show(value)}")
        return size

    return convert_size


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        if value in ("true", "false"):
            hint = "; remove the quotes"
        else:
            hint = _did_you_mean(value, ("true", "false"), quote=False)
        raise _BadValue(f"expected true or false, got {_show(value)}{hint}")
    return value


def _choice(options: tuple[_T, ...]) -> Callable[[object], _T]:
    def convert_choice(value: object) -> _T:
        for option in options:
            if value == option:
                return option
        listed = " or ".join(f'"{option}"' for option in options)
        hint = _did_you_mean(value, tuple(str(option) for option in options))
        raise _BadValue(f"expected {listed}, got {_show(value)}{hint}")

    return convert_choice


def _did_you_mean(value: object, options: tuple[str, ...], *, quote: bool = True) -> str:
    """`; did you mean "eager"?` for a mistyped word, else ""; like unknown keys."""
    if not isinstance(value, str):
        return ""
    # Case first: "Lazy" is closer to "lazy" than difflib's ratio alone says.
    lowered = [option for option in options if option.lower() == value.lower()]
    close = lowered or difflib.get_close_matches(value, options, n=1)
    if not close:
        return ""
    return f"; did you mean {_show(close[0]) if quote else close[0]}?"


def _listen(value: object) -> ListenConfig:
    expected = 'expected "host:port" like "127.0.0.1:8080" or "[::1]:8080"'
    if isinstance(value, int) and not isinstance(value, bool):
        raise _BadValue(
            f'{expected}, got {value}; write "127.0.0.1:{value}" (this host only)'
            f' or "0.0.0.0:{value}" (every interface)'
        )
    if not isinstance(value, str):
        raise _BadValue(f"{expected}, got {_show(value)}")
    match = re.fullmatch(r"(?:\[(?P<ipv6>[^\]]*)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]+)", value)
    if match is None:
        if value.count(":") > 1 and not value.startswith("["):
            raise _BadValue(f"{expected}, got {_show(value)}; put IPv6 addresses in brackets")
        raise _BadValue(f"{expected}, got {_show(value)}")
    port = int(match["port"])
    if port > 65535:
        raise _BadValue(f"expected a port from 0 to 65535, got {_show(value)}")
    host = match["ipv6"] if match["ipv6"] is not None else match["host"]
    if host == "":
        # Explicit beats implicit for a sidecar: ":8080" reads as "localhost" to
        # some and "every interface" to others, and only one of those is safe.
        raise _BadValue(
            f'{expected}, got {_show(value)}; write "127.0.0.1:{port}" (this host only)'
            f' or "0.0.0.0:{port}" (every interface)'
        )
    if not _valid_listen_host(host, ipv6=match["ipv6"] is not None):
        raise _BadValue(f"{expected}, got {_show(value)}; {_show(host)} is not a valid host")
    return ListenConfig(host=host, port=port)


def _valid_listen_host(host: str, *, ipv6: bool) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return not ipv6 and _is_hostname(host)
    return address.version == (6 if ipv6 else 4)


def _is_hostname(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    # An all-digit last label is a mistyped IPv4 address, not a name (RFC 3696 §2).
    return (
        len(host) <= 253
        and not labels[-1].isdigit()
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
    )


def _http_url(
    value: object,
    example: str,
    *,
    credentials_hint: str = "send credentials with upstream headers such as Authorization",
) -> SplitResult:
    """Checks shared by app, upstream and auth URLs; the message says what to change."""
    expected = f'expected an http:// or https:// URL like "{example}"'
    if not isinstance(value, str):
        raise _BadValue(f"{expected}, got {_show(value)}")
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the URL holds a password, and URLs end up in logs.
        raise _BadValue(
            f"the URL must not contain user:password@ (URLs are logged); {credentials_hint}"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname or _CONTROL.search(value):
        raise _BadValue(f"{expected}, got {_show(value)}")
    try:
        port = parts.port
    except ValueError:  # not a number, or above 65535
        port = -1
    if port is not None and not 0 < port < 65536:
        raise _BadValue(f"expected a port from 1 to 65535 in the URL, got {_show(value)}")
    if parts.fragment or "#" in value:
        raise _BadValue(f"expected a URL without #fragment (it is never sent), got {_show(value)}")
    return parts


def _auth_url(value: object) -> str:
    return _http_url(
        value,
        "http://127.0.0.1:8000/auth",
        credentials_hint="the client's forwarded headers are the credentials",
    ).geturl()


def _auth_header_name(value: object) -> str:
    """A header name for the auth request, lowercased (HTTP names ignore case)."""
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise _BadValue(
            f"expected an HTTP header name like {_show('cookie')} (letters, digits and"
            f" !#$%&'*+-.^_`|~ only, RFC 9110 §5.6.2), got {_show(value)}"
        )
    name = value.lower()
    reason = _AUTH_REFUSED_HEADERS.get(name)
    if reason is not None:
        raise _BadValue(f"{value} cannot be sent to the auth endpoint: {reason}")
    return name


def _token_param(value: object) -> str:
    if not isinstance(value, str) or not _QUERY_NAME.fullmatch(value):
        raise _BadValue(
            'expected a query parameter name like "token" (letters, digits and -._~ only),'
            f" got {_show(value)}"
        )
    if value in _LAST_EVENT_ID_PARAMS:
        raise _BadValue(
            f"expected a name other than {_show(value)}, which clients use to resume"
            ' (Last-Event-ID); use e.g. "token"'
        )
    return value


def _token_scheme(value: object) -> str:
    if not isinstance(value, str) or (value and not _TOKEN.fullmatch(value)):
        raise _BadValue(
            'expected an auth scheme like "Bearer", or "" to send the token alone,'
            f" got {_show(value)}"
        )
    return value


def _network(value: object) -> str:
    expected = 'expected an IP address or CIDR like "10.0.0.0/8" or "::1"'
    if not isinstance(value, str):
        raise _BadValue(f"{expected}, got {_show(value)}")
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise _BadValue(f"{expected}, got {_show(value)}") from None


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = _did_you_mean(value, ("auto",))
        raise _BadValue(
            f'expected an integer >= 1 or "auto" (one per CPU), got {_show(value)}{hint}'
        )
    return value


def _app_origin(value: object) -> str:
    parts = _http_url(value, "http://127.0.0.1:8000")
    if parts.path not in ("", "/") or parts.query or "?" in str(value):
        raise _BadValue(
            f'expected only scheme://host:port, like "http://127.0.0.1:8000", got {_show(value)}:'
            " each request keeps its own path and query"
        )
    return f"{parts.scheme}://{parts.netloc}"


def _upstream_url(value: object) -> str:
    return _http_url(value, "http://127.0.0.1:8000/events").geturl()


def _route_path(value: object) -> str:
    expected = 'expected a path starting with "/", like "/events"'
    if not isinstance(value, str) or not value.startswith("/") or _CONTROL.search(value):
        raise _BadValue(f"{expected}, got {_show(value)}")
    if "?" in value or "#" in value:
        raise _BadValue(
            f"{expected} without ? or #, got {_show(value)}:"
            " routes match on the path alone (clients add their own query, e.g. last_event_id)"
        )
    return value


def _origin(value: object) -> str:
    """An origin as browsers send it: lowercase scheme and host, default port omitted."""
    expected = 'expected an origin like "https://app.example.com" (scheme://host[:port], no path)'
    if not isinstance(value, str):
        raise _BadValue(f"{expected}, got {_show(value)}")
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.path == "/" and not parts.query and not parts.fragment:
        raise _BadValue(f'{expected}, got {_show(value)}; drop the trailing "/"')
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (
        not parts.scheme
        or not parts.hostname
        or parts.path
        or parts.query
        or parts.fragment
        or "#" in value
        or "?" in value
        or parts.username is not None
        or port == -1
        or _CONTROL.search(value)
    ):
        raise _BadValue(f"{expected}, got {_show(value)}")
    host = parts.hostname
    default_port = {"http": 80, "https": 443}.get(parts.scheme)
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != default_port:
        netloc += f":{port}"
    return f"{parts.scheme}://{netloc}"


def _event_name(value: object) -> str:
    if not isinstance(value, str) or not value or "\r" in value or "\n" in value:
        raise _BadValue(
            f'expected an event name like "heartbeat" (not empty, no CR or LF), got {_show(value)}'
        )
    if value == "message":
        raise _BadValue(
            'expected a name other than "message", which EventSource delivers to onmessage'
            ' with the real events; use e.g. "heartbeat"'
        )
    return value


def _retry_ms(value: object) -> int:
    # SSE's `retry:` field counts milliseconds while a bare number here would mean
    # seconds like every other duration; `retry: 3000` is ambiguous, so a unit is
    # required.
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise _BadValue(
            f'expected a duration with a unit, like "3s" or "3000ms", got {_show(value)}:'
            " a bare number is ambiguous here (SSE counts retry in milliseconds)"
        )
    return round(parse_duration(value) * 1000)


def _format_duration(seconds: float) -> str:
    for unit in ("h", "m", "s"):
        size = _DURATION_UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s" if seconds >= 1 or seconds == 0 else f"{seconds * 1000:g}ms"


def _format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size >= _SIZE_UNITS[unit] and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"
