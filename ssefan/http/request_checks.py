"""What a request line and its Host must be before anything routes it, sans-I/O.

One rule for both sides: the server routes by what `check_request` returns and
the pass-through forwards that same reading, so a request the two would read
differently (a stream for ssefan, something else for the app) never gets past
the door. h11 has already checked the syntax (RFC 9112 §3: three tokens, a
target of visible ASCII, header lines); this is what h11 leaves to the server:

* The version: HTTP/1.0 and HTTP/1.1 are served, anything else is 505 (RFC
  9110 §15.6.6). That includes the HTTP/2 prior-knowledge preface (`PRI *
  HTTP/2.0`, RFC 9113 §3.4), which h11 parses as a request, and HTTP/1.2 to
  1.9: RFC 9110 §2.5 lets a server take those as 1.1 (SHOULD), but no such
  version exists, and h11's rules that key on exactly b"1.1" (a Host is
  required, streams are chunked) would not apply to them.
* The target (RFC 9112 §3.2): origin-form `/path?query`; absolute-form
  `http(s)://host[:port]/path?query`, which a server MUST accept (§3.2.2);
  asterisk-form `*` only with OPTIONS (§3.2.4). Anything else (`events`,
  `ftp://x/events`, `x:/events`, a `#fragment`, user info in the authority)
  is 400. CONNECT (authority-form, §3.2.3) is 501: ssefan is a reverse
  proxy, not a tunnel to anywhere (RFC 9110 §9.1: a method the server does
  not implement for any resource).
* The Host (RFC 9112 §3.2): "A server MUST respond with a 400 ... to any
  HTTP/1.1 request message that lacks a Host header field and to any request
  message that contains more than one Host header field line or a Host header
  field with an invalid field value." Valid is `host [":" port]` (RFC 9110
  §7.2, RFC 3986 §3.2.2), see `valid_host`. With an absolute-form target, the
  target's authority is the host and the Host header is replaced by it when
  forwarded (RFC 9112 §3.2.2).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = [
    "SERVED_VERSIONS",
    "BadRequest",
    "CheckedRequest",
    "RequestTarget",
    "TargetForm",
    "check_request",
    "check_target",
    "valid_host",
]

SERVED_VERSIONS = frozenset({b"1.0", b"1.1"})

# RFC 3986 §3.1 scheme, then "//" authority, path-abempty, optional query (a
# '#' was refused before this is tried).
_ABSOLUTE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<authority>[^/?]*)(?P<path>/[^?]*)?(?:\?(?P<query>.*))?"
)
# A reg-name of RFC 3986 unreserved characters (letters, digits, - . _ ~): every
# DNS name and every IPv4 address is one. RFC 3986 also allows sub-delims
# (!$&'()*+,;=) and percent-escapes, which no resolvable name has, and a ',' or
# ';' would split X-Forwarded-Host or Forwarded into several claims: refused.
# 255 octets is DNS's limit on a name (RFC 1035 §2.3.4).
_REG_NAME = re.compile(rb"[A-Za-z0-9._~-]{1,255}")
_PORT = re.compile(rb"[0-9]{1,5}")
MAX_PORT = 65535


class TargetForm(Enum):
    ORIGIN = "origin"  # /path?query (RFC 9112 §3.2.1)
    ABSOLUTE = "absolute"  # http://host/path?query (§3.2.2)
    ASTERISK = "asterisk"  # * : the server as a whole, OPTIONS only (§3.2.4)


@dataclass(frozen=True, slots=True)
class BadRequest:
    """A request refused at the door: `status` and a one-line reason.

    The reason never quotes the request (it may hold a token).
    """

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class RequestTarget:
    form: TargetForm
    path: str  # what routing looks at ("*" for the asterisk form)
    query: str
    authority: bytes | None  # an absolute-form target's host[:port]
    forward: bytes  # the target as sent on to the app: origin-form, or b"*"


@dataclass(frozen=True, slots=True)
class CheckedRequest:
    target: RequestTarget
    # The host the request is for, valid by `valid_host`: the absolute-form
    # target's authority, else the Host header; None for an HTTP/1.0 request
    # without either.
    host: bytes | None


def valid_host(value: bytes) -> bool:
    """True if `value` is `host [":" port]` as ssefan accepts it (RFC 9110 §7.2).

    The host is a bracketed IPv6 address (RFC 3986 §3.2.2 IP-literal, without
    a zone: RFC 9110 has no use for one, and IPvFuture names nothing yet), or a
    reg-name of letters, digits and `-._~` (see _REG_NAME). The port is 1 to 5
    digits, at most 65535; `host:` with an empty port, which RFC 3986 allows
    and no client sends, is refused rather than passed on for the app to
    parse.
    """
    if value.startswith(b"["):
        end = value.find(b"]")
        if end == -1 or not _ipv6(value[1:end]):
            return False
        rest = value[end + 1 :]
    else:
        name, colon, port = value.partition(b":")
        if not _REG_NAME.fullmatch(name):
            return False
        rest = colon + port
    if not rest:
        return True
    port = rest[1:]
    return rest[:1] == b":" and _PORT.fullmatch(port) is not None and int(port) <= MAX_PORT


def _ipv6(literal: bytes) -> bool:
    if b"%" in literal:
        return False
    try:
        ipaddress.IPv6Address(literal.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return False
    return True


def check_target(method: bytes, target: bytes) -> RequestTarget | BadRequest:
    """The request target, read the one way both routing and forwarding use."""
    if method == b"CONNECT":
        return BadRequest(501, "CONNECT is not supported: ssefan is a reverse proxy")
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        return BadRequest(400, "request target must be ASCII")
    if "#" in text:
        # RFC 9112 §3.2: a request target has no fragment. Servers differ on
        # whether `/x#/../events` is `/x` or `/events`: neither side guesses.
        return BadRequest(400, "request target must not have a #fragment")
    if text.startswith("/"):
        path, _, query = text.partition("?")
        return RequestTarget(TargetForm.ORIGIN, path, query, None, target)
    if text == "*":
        if method != b"OPTIONS":
            return BadRequest(400, "request target * is only for OPTIONS")
        return RequestTarget(TargetForm.ASTERISK, "*", "", None, b"*")
    match = _ABSOLUTE.fullmatch(text)
    if match is None or match["scheme"].lower() not in ("http", "https"):
        return BadRequest(400, "request target must be a path (/...) or an http(s):// URL")
    authority = match["authority"].encode("ascii")
    if b"@" in authority:
        # RFC 9110 §4.2.4: userinfo in an http(s) URI is to be treated as an error.
        return BadRequest(400, "request target must not have user info (user@host)")
    if not valid_host(authority):
        return BadRequest(400, "request target's host is not a valid host[:port]")
    path, query = match["path"], match["query"]
    if not path and query is None and method == b"OPTIONS":
        # RFC 9112 §3.2.4: OPTIONS for `http://host` (no path) is OPTIONS *.
        return RequestTarget(TargetForm.ASTERISK, "*", "", authority, b"*")
    path = path or "/"  # RFC 9112 §3.2.1: an empty path is sent as "/"
    forward = path if query is None else f"{path}?{query}"
    return RequestTarget(TargetForm.ABSOLUTE, path, query or "", authority, forward.encode("ascii"))


def check_request(
    method: bytes,
    target: bytes,
    http_version: bytes,
    headers: Iterable[tuple[bytes, bytes]],
) -> CheckedRequest | BadRequest:
    """Whether ssefan serves this request at all, and if so for what target and host.

    Args:
        method, target, http_version: the request line as h11 parsed it.
        headers: the request's header lines (names in any case).

    Returns:
        CheckedRequest to route and forward by, or BadRequest to answer with
        (505, 501 or 400; the connection should close after it: a client that
        sends these may well send more of them, or a tunnel's bytes).
    """
    if http_version not in SERVED_VERSIONS:
        version = http_version.decode("ascii", "replace")[:8]
        return BadRequest(505, f"HTTP/{version} is not supported: use HTTP/1.1")
    checked = check_target(method, target)
    if isinstance(checked, BadRequest):
        return checked
    hosts = [bytes(value) for name, value in headers if name.lower() == b"host"]
    if len(hosts) > 1:
        return BadRequest(400, "request has more than one Host header")
    if not hosts and http_version == b"1.1":
        return BadRequest(400, "HTTP/1.1 request has no Host header")
    if hosts and not valid_host(hosts[0]):
        return BadRequest(400, "request's Host header is not a valid host[:port]")
    host = checked.authority if checked.authority is not None else (hosts[0] if hosts else None)
    return CheckedRequest(checked, host)
