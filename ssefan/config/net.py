"""Values of the network and of HTTP: listen addresses, hosts, URLs, route
paths, origins, networks, header names and values, query parameter names.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit

from ssefan.config.schema import ListenConfig
from ssefan.config.values import _BadValue, _kind, _show
from ssefan.core.template import TemplateError, is_template, parse_route

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
# Query parameters the server reads as Last-Event-ID (admission.LAST_EVENT_ID_PARAMS;
# not imported: config must not pull in the server stack).
_LAST_EVENT_ID_PARAMS = ("last_event_id", "lastEventId", "evs_last_event_id")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


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
    if is_template(value):
        # `/jobs/{job}/progress` or `/events?topic={topic}`: its own grammar.
        try:
            parse_route(value)
        except TemplateError as err:
            raise _BadValue(str(err)) from None
        return value
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
