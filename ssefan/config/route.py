"""One route and what it holds: upstream (and its headers), start, cors, auth."""

from __future__ import annotations

import difflib
from typing import Literal

from ssefan.config.keys import (
    _AUTH_KEYS,
    _CORS_KEYS,
    _MISPLACED_IN_ROUTE,
    _ROUTE_KEYS,
    _START_KEYS,
    _UPSTREAM_KEYS,
)
from ssefan.config.net import (
    _auth_header_name,
    _auth_url,
    _header_name_problem,
    _header_value_problem,
    _origin,
    _route_path,
    _token_param,
    _token_scheme,
    _upstream_url,
)
from ssefan.config.reader import _join, _Reader, _Section, _written
from ssefan.config.schema import (
    _AUTH_DEFAULTS,
    _CORS_DEFAULTS,
    _ROUTE_DEFAULTS,
    _UPSTREAM_DEFAULTS,
    AuthConfig,
    CorsConfig,
    RouteConfig,
    StartConfig,
    UpstreamConfig,
)
from ssefan.config.templates import check_template, read_key
from ssefan.config.values import (
    _BadValue,
    _boolean,
    _choice,
    _duration,
    _event_name,
    _format_duration,
    _format_size,
    _integer,
    _kind,
    _optional,
    _retry_ms,
    _show,
    _size,
)
from ssefan.core.template import (
    is_template,
)

_Mode = Literal["eager", "lazy"]
_OnGap = Literal["replay", "live"]
_MODES: tuple[_Mode, ...] = ("eager", "lazy")
_ON_GAP: tuple[_OnGap, ...] = ("replay", "live")
_REFUSE: tuple[Literal["retry", "status"], ...] = ("retry", "status")


def _read_route(reader: _Reader, raw: object, path: str) -> RouteConfig | None:
    section = reader.section(
        raw, path, _ROUTE_KEYS, "a mapping with at least path and upstream", _MISPLACED_IN_ROUTE
    )
    if section is None:
        return None
    d = _ROUTE_DEFAULTS
    route_path = section.require("path", _route_path, 'the path clients request, like "/events"')
    upstream = _read_required_upstream(section)
    template = route_path is not None and is_template(route_path)
    route = RouteConfig(
        path=route_path or d.path,
        upstream=upstream or d.upstream,
        key=section.nested("key", read_key, d.key),
        max_channels=section.get("max_channels", _optional(_integer(minimum=1)), d.max_channels),
        buffer=section.get("buffer", _integer(minimum=1), d.buffer),
        buffer_bytes=section.get("buffer_bytes", _size(), d.buffer_bytes),
        buffer_age=section.get("buffer_age", _duration(), d.buffer_age),
        heartbeat=section.get("heartbeat", _duration(positive=True), d.heartbeat),
        heartbeat_event=section.get("heartbeat_event", _optional(_event_name), d.heartbeat_event),
        retry=section.get("retry", _optional(_retry_ms), d.retry),
        # A template's channels come and go with their keys' clients.
        mode=section.get("mode", _choice(_MODES), "lazy" if template else d.mode),
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
    ok = check_template(reader, section, route) if upstream is not None else True
    return None if route_path is None or upstream is None or not ok else route


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
