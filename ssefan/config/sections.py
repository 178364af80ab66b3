"""The document's top level: listen, app, proxy, trusted_proxies, admin and the
list of routes, with the checks across them.
"""

from __future__ import annotations

import os
from typing import Literal

from ssefan.config.keys import (
    _ADMIN_KEYS,
    _CONFIG_KEYS,
    _HTTP2_KEYS,
    _LISTEN_KEYS,
    _MISPLACED_AT_TOP,
    _PROXY_KEYS,
    _TLS_KEYS,
)
from ssefan.config.net import _app_origin, _listen, _network
from ssefan.config.reader import _Reader, _Section, _written
from ssefan.config.route import _read_route
from ssefan.config.schema import (
    _CONFIG_DEFAULTS,
    _PROXY_DEFAULTS,
    AdminConfig,
    Config,
    Http2Config,
    ListenConfig,
    ProxyConfig,
    RouteConfig,
    TLSConfig,
)
from ssefan.config.tls import TLSProblem, server_context
from ssefan.config.values import (
    _BadValue,
    _duration,
    _format_duration,
    _integer,
    _optional,
    _show,
    _size,
    _workers,
)
from ssefan.core.paths import routing_path
from ssefan.core.template import (
    RouteTemplate,
    TemplateError,
    is_template,
    matches_static,
    overlaps,
    parse_route,
)


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
    listen = _read_listen(reader, section)
    app = section.get("app", _optional(_app_origin), d.app)
    has_app = section.values.get("app") is not None
    routes = _read_routes(reader, section.values.get("routes"), has_app)
    admin = section.nested("admin", _read_admin, d.admin)
    config = Config(
        listen=listen or d.listen,
        app=app,
        routes=routes or (),
        max_clients=section.get("max_clients", _integer(minimum=1), d.max_clients),
        max_channels=section.get("max_channels", _integer(minimum=1), d.max_channels),
        ring_bytes_total=section.get("ring_bytes_total", _size(), d.ring_bytes_total),
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
        state_dir=section.get("state_dir", _optional(_state_dir), _default_state_dir()),
        state_sync=section.get("state_sync", _duration(positive=True), d.state_sync),
        source=reader.source,
    )
    _check_shutdown(reader, section, config)
    if listen is not None and admin is not None:
        _check_admin_listen(reader, listen, admin.listen)
    return None if listen is None or routes is None else config


def _read_listen(reader: _Reader, section: _Section) -> ListenConfig | None:
    """`listen: HOST:PORT`, or the mapping form `{address: HOST:PORT, tls: {...}}`."""
    raw = section.values.get("listen")
    if not isinstance(raw, dict):
        return section.require("listen", _listen, 'the address to serve on, like "127.0.0.1:8080"')
    listen = reader.section(
        raw,
        "listen",
        _LISTEN_KEYS,
        'a mapping like {address: "0.0.0.0:8443", tls: {cert: FILE, key: FILE}}',
    )
    if listen is None:
        return None
    address = listen.require("address", _listen, 'the address to serve on, like "0.0.0.0:8443"')
    raw_tls = listen.values.get("tls")
    tls = None if raw_tls is None else _read_tls(reader, raw_tls, "listen.tls")
    http2 = listen.nested("http2", _read_http2, Http2Config())
    if address is None or (raw_tls is not None and tls is None):
        return None
    return ListenConfig(host=address.host, port=address.port, tls=tls, http2=http2)


def _read_http2(reader: _Reader, raw: object, path: str) -> Http2Config | None:
    section = reader.section(raw, path, _HTTP2_KEYS, "a mapping like {max_concurrent_streams: 100}")
    if section is None:
        return None
    streams = section.get("max_concurrent_streams", _stream_limit, 100)
    return Http2Config(max_concurrent_streams=streams)


def _stream_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise _BadValue(
            f"expected the streams one HTTP/2 connection may open, from 1 to 10000 (browsers"
            f" use what is advertised; 100 is the usual value), got {_show(value)}"
        )
    return value


def _read_tls(reader: _Reader, raw: object, path: str) -> TLSConfig | None:
    section = reader.section(raw, path, _TLS_KEYS, "a mapping with cert and key (PEM files)")
    if section is None:
        return None
    cert = section.require(
        "cert", _file_path, 'the certificate chain, like "/etc/ssefan/tls/fullchain.pem"'
    )
    key = section.require("key", _file_path, 'its private key, like "/etc/ssefan/tls/privkey.pem"')
    before = len(reader.problems)
    default_alpn: tuple[str, ...] = ("h2", "http/1.1")
    default_version: Literal["1.2", "1.3"] = "1.2"
    min_version = section.get("min_version", _tls_version, default_version)
    alpn = section.nested("alpn", _read_alpn, default_alpn)
    if cert is None or key is None or len(reader.problems) > before:
        return None
    tls = TLSConfig(cert=cert, key=key, min_version=min_version, alpn=alpn)
    try:
        # The files as they are now: check refuses what serve could not load.
        server_context(tls)
    except TLSProblem as problem:
        reader.report(section.path_of(problem.field), problem.message)
        return None
    return tls


def _file_path(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadValue(
            f'expected a file path like "/etc/ssefan/tls/fullchain.pem", got {_show(value)}'
        )
    return value


def _tls_version(value: object) -> Literal["1.2", "1.3"]:
    # YAML reads an unquoted 1.2 as a number: take it as the version it spells.
    text = str(value) if isinstance(value, str | float) and not isinstance(value, bool) else None
    if text == "1.2":
        return "1.2"
    if text == "1.3":
        return "1.3"
    raise _BadValue(f'expected "1.2" or "1.3" (the lowest TLS version served), got {_show(value)}')


def _read_alpn(reader: _Reader, raw: object, path: str) -> tuple[str, ...] | None:
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if raw == [] else _show(raw)
        reader.report(path, f"expected a list of protocols like [http/1.1], got {got}")
        return None
    ok = True
    for index, item in enumerate(raw):
        if item not in ("h2", "http/1.1"):
            reader.report(f"{path}[{index}]", f"expected h2 or http/1.1, got {_show(item)}")
            ok = False
    if ok and len(set(raw)) < len(raw):
        reader.report(path, "a protocol is listed more than once; keep one of each")
        ok = False
    return tuple(raw) if ok else None


def _state_dir(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _BadValue(f'expected a directory path like "/var/lib/ssefan", got {_show(value)}')
    return value


def _default_state_dir() -> str | None:
    """systemd's StateDirectory= (the first, if it lists several), else none."""
    first = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return first or None


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
    _check_templates_apart(reader, routes)
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


def _check_templates_apart(reader: _Reader, routes: list[RouteConfig | None]) -> None:
    """Every request path has one route: no two templates can match one path,
    and no static route takes every request a template would match."""
    templates: list[tuple[int, RouteTemplate]] = []
    statics: list[tuple[int, str]] = []
    for index, route in enumerate(routes):
        if route is None:
            continue
        if not is_template(route.path):
            statics.append((index, route.path))
            continue
        try:
            templates.append((index, parse_route(route.path, pattern=route.key.pattern)))
        except TemplateError:
            continue  # reported with the route
    for position, (index, template) in enumerate(templates):
        for first, earlier in templates[:position]:
            if overlaps(earlier, template):
                reader.report(
                    f"routes[{index}].path",
                    f"{_show(template.source)} can match the same requests as routes[{first}]"
                    f".path {_show(earlier.source)}; make a literal segment differ, or narrow"
                    " one key pattern so that no key fits both",
                )
        if template.segments and not template.params:
            continue  # a static path a path template matches is fine: the static wins
        for first, static in statics:
            if matches_static(template, static):
                reader.report(
                    f"routes[{index}].path",
                    f"{_show(template.source)} is never reached: routes[{first}].path"
                    f" {_show(static)} takes every request for that path (a static route wins);"
                    " give the template a path of its own",
                )


def _route_path_of(item: object) -> object:
    return item.get("path") if isinstance(item, dict) else None
