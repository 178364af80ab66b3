"""Header rules for one proxy hop, sans-I/O: what crosses, what is added, what is hidden.

* Hop-by-hop headers describe one connection, not the message, and never
  cross a proxy (RFC 9110 §7.6.1).
* X-Forwarded-For / -Proto / -Host tell the app who the client was. They are
  trusted only from configured front proxies; from anyone else they are
  replaced, or a client could claim any address. A host in X-Forwarded-Host
  or in a `Forwarded: host=` is always a valid host[:port]
  (request_checks.valid_host): apps build absolute URLs (redirects, password
  reset links) from it.
* Every request carries an id (X-Request-ID) that ties ssefan's log lines to the
  app's.
* Credentials in a request target (a `?token=`) are redacted before a target is
  logged.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from urllib.parse import parse_qsl, urlencode

from ssefan.http.request_checks import valid_host

__all__ = [
    "HOP_BY_HOP",
    "REDACTED",
    "Header",
    "TargetRedactor",
    "TrustedProxies",
    "connection_tokens",
    "describe_exception",
    "describe_h11_error",
    "forwarded_headers",
    "header_values",
    "new_request_id",
    "request_id_from",
    "strip_hop_by_hop",
    "without_params",
]

Header = tuple[bytes, bytes]

# RFC 9110 §7.6.1 lists Connection, Proxy-Connection, Keep-Alive, TE,
# Transfer-Encoding and Upgrade; Trailer and Proxy-Authenticate/-Authorization
# are hop-by-hop too (RFC 9110 §6.6.2, §11.7: they address the proxy itself).
# Transfer-Encoding is re-created by h11 for each hop's own framing.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# X-Forwarded-* and RFC 7239 Forwarded: client-identity claims, kept only from
# trusted peers.
_IDENTITY = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})

# RFC 7239 §4: forwarded-pair = token "=" value, value = token / quoted-string;
# pairs are joined by ";" and elements by ",".
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_FORWARDED_PAIR = re.compile(
    rb"[ \t]*(" + _TOKEN + rb")=(" + _TOKEN + rb'|"(?:[^"\\]|\\.)*")[ \t]*(?:[;,]|$)'
)
_QUOTED_PAIR = re.compile(rb"\\(.)")

# A request id the client sent is kept (and logged) if it looks like an id:
# UUIDs, hex, base64 and the like, bounded. Anything else could forge log
# lines or carry junk, and is replaced by our own.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,128}")
# 16 hex digits: unique enough per process lifetime, short in log lines.
_REQUEST_ID_BYTES = 8

# What a hidden value becomes; the same mark as the log formatter's (logs.py).
REDACTED = "***"
# Query parameters always redacted in logged targets, besides each route's
# configured token parameter: OAuth's bearer-token parameter (RFC 6750 §2.3).
ALWAYS_REDACTED_PARAMS = ("access_token",)
# Logged targets are cut here: a 16 KiB query string is not a log line.
MAX_LOGGED_TARGET = 256


def header_values(headers: Iterable[Header], name: bytes) -> list[bytes]:
    return [bytes(value) for key, value in headers if key.lower() == name]


def connection_tokens(headers: Iterable[Header]) -> frozenset[bytes]:
    """Lowercased options of every Connection header (RFC 9110 §7.6.1)."""
    tokens: set[bytes] = set()
    for value in header_values(headers, b"connection"):
        tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return frozenset(tokens)


def strip_hop_by_hop(headers: Iterable[Header]) -> list[Header]:
    """Headers minus the hop-by-hop ones and any the Connection header names."""
    headers = list(headers)
    # RFC 9110 §7.6.1: "a proxy MUST ... remove any header ... listed in the
    # Connection header field"; a sender lists its own hop-by-hop extensions there.
    dropped = HOP_BY_HOP | connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in dropped]


class TrustedProxies:
    """The peers (IPs or CIDRs) whose X-Forwarded-* claims are believed."""

    __slots__ = ("_networks",)

    def __init__(self, cidrs: Sequence[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)

    def __contains__(self, peer_ip: object) -> bool:
        if not self._networks or not isinstance(peer_ip, str):
            return False
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # a dual-stack listener sees ::ffff:10.0.0.1
        return any(address in network for network in self._networks)


def forwarded_headers(
    headers: Sequence[Header], *, peer_ip: str, scheme: str, trusted: bool
) -> list[Header]:
    """`headers` with X-Forwarded-For/-Proto/-Host set for this hop.

    From a trusted peer each is appended to what it sent (so the app sees the
    whole chain, as Werkzeug's ProxyFix and similar count it); from anyone else
    they, and RFC 7239 `Forwarded`, are replaced: a client could claim anything.
    """
    host_values = header_values(headers, b"host")
    # The server refused an invalid Host (request_checks); checked again here
    # so that no caller can put one into X-Forwarded-Host.
    host = host_values[0] if host_values and valid_host(host_values[0]) else None
    ours = (
        (b"X-Forwarded-For", peer_ip.encode("ascii")),
        (b"X-Forwarded-Proto", scheme.encode("ascii")),
        (b"X-Forwarded-Host", host),
    )
    out = [(name, value) for name, value in headers if name.lower() not in _IDENTITY]
    if trusted:
        # Even a trusted proxy may pass on what its client said (nginx's
        # $http_host): a Forwarded line with an invalid host= is dropped whole.
        out += [
            (name, value)
            for name, value in headers
            if name.lower() == b"forwarded" and _forwarded_hosts_valid(value)
        ]
    for name, value in ours:
        chain = header_values(headers, name.lower()) if trusted else []
        if name == b"X-Forwarded-Host":
            chain = _valid_hosts(chain)
        if value is not None:
            chain.append(value)
        if chain:
            # RFC 9110 §5.3: repeated fields are one comma-separated list.
            out.append((name, b", ".join(chain)))
    return out


def _valid_hosts(values: Iterable[bytes]) -> list[bytes]:
    """The valid hosts of X-Forwarded-Host lines, as one list (invalid ones dropped)."""
    hosts = (host.strip() for value in values for host in value.split(b","))
    return [host for host in hosts if valid_host(host)]


def _forwarded_hosts_valid(value: bytes) -> bool:
    """True if `value` is a well-formed RFC 7239 Forwarded field whose every
    `host=` is a valid host[:port] (RFC 7239 §5.3: the Host as received)."""
    value = value.strip()
    at = 0
    while at < len(value):
        pair = _FORWARDED_PAIR.match(value, at)
        if pair is None or pair.end() == at:
            return False
        at = pair.end()
        name, field_value = pair[1], pair[2]
        if name.lower() == b"host":
            if field_value.startswith(b'"'):
                field_value = _QUOTED_PAIR.sub(rb"\1", field_value[1:-1])
            if not valid_host(field_value):
                return False
    return True


def describe_h11_error(exc: Exception) -> str:
    """h11's message without the bytes it quotes.

    h11 quotes the offending line ("illegal header line: bytearray(b'Cookie:
    ...')"), which may hold a cookie or token: only the part before the quote
    is kept for logs and answers.
    """
    message = str(exc)
    for quote in ("bytearray(", "b'", 'b"', "'", '"'):
        cut = message.find(quote)
        if cut != -1:
            message = message[:cut].rstrip(" :") + " (value not shown)"
    return message[:200]


def describe_exception(exc: BaseException) -> str:
    """An exception as a log fragment: its type, and its message when it has one."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def new_request_id() -> str:
    return secrets.token_hex(_REQUEST_ID_BYTES)


def request_id_from(headers: Iterable[Header]) -> str | None:
    """The client's X-Request-ID when it is a plausible id, else None."""
    values = header_values(headers, b"x-request-id")
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0].decode("ascii")
    return None


class TargetRedactor:
    """Makes request targets safe to log: credential parameters hidden, length capped."""

    __slots__ = ("_params",)

    def __init__(self, params: Iterable[str] = ()) -> None:
        self._params = frozenset(params) | frozenset(ALWAYS_REDACTED_PARAMS)

    def __call__(self, target: str) -> str:
        path, sep, query = target.partition("?")
        if sep and any(name in query for name in self._params):
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(name, REDACTED if name in self._params else value) for name, value in pairs],
                safe="/:*",
            )
            target = f"{path}?{query}"
        if len(target) > MAX_LOGGED_TARGET:
            target = target[:MAX_LOGGED_TARGET] + "..."
        return target


def without_params(query: str, names: Iterable[str]) -> str:
    """`query` without the parameters `names` (e.g. a token moved into a header)."""
    drop = frozenset(names)
    if not query or not any(name in query for name in drop):
        return query
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(n, v) for n, v in pairs if n not in drop], safe="/:")
