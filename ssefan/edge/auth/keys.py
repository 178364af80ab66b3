"""Who is asking: a stream request's credential, and the key it is known by.

The credential is what the auth endpoint is sent: the client's configured
credential headers (and a `?token=` moved into a header), plus where the
client wanted to go and where it is. Its key is a keyed hash (HMAC-SHA256, key
made per process) of what identifies the client in that: the raw values are
never a log field, a metric label or a dict key, and a logged fingerprint
can't be matched offline against a guessed cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from ssefan.config import AuthConfig
from ssefan.http.forwarding import (
    Header,
    TrustedProxies,
    forwarded_headers,
    header_values,
    without_params,
)

__all__ = ["Credential", "CredentialKeys"]

# Client headers that go into the auth request's X-Forwarded-* (nothing else
# the client sent reaches the auth endpoint unless `forward` names it).
_IDENTITY_INPUT = frozenset(
    {b"host", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)


@dataclass(frozen=True, slots=True)
class Credential:
    """What identifies one client to the auth endpoint, and how to ask about it.

    `headers` holds cookie and token values: never log or print it (its repr
    is hidden). `fingerprint` is what log lines show.
    """

    key: bytes
    headers: tuple[Header, ...] = field(repr=False)

    @property
    def fingerprint(self) -> str:
        return self.key.hex()[:12]


class CredentialKeys:
    """One route's credentials: what of a request is sent, and its keyed hash."""

    def __init__(self, config: AuthConfig, trusted: TrustedProxies) -> None:
        self.config = config
        self.trusted = trusted
        self._forward = tuple(name.lower().encode("ascii") for name in config.forward)
        self._token_header = config.token_header.encode("ascii")
        self._secret = secrets.token_bytes(32)

    def credential(
        self,
        request_headers: Sequence[Header],
        path: str,
        query: str,
        *,
        peer_ip: str,
        scheme: str,
        volatile_params: Iterable[str] = (),
    ) -> Credential:
        """The credential of a stream request, and the auth request that asks about it.

        `volatile_params` (the resume cursor) change on every reconnect and say
        nothing about who the client is: they are kept out of the cache key.
        """
        sent: list[Header] = [
            (name, bytes(value)) for name, value in request_headers if name.lower() in self._forward
        ]
        token = self._query_token(query)
        if token is not None and not header_values(sent, self._token_header):
            # A real header wins: the parameter is the fallback for EventSource.
            sent.append((self._token_header, token))
        # The token moved into a header: it has no business in X-Forwarded-Uri,
        # where auth endpoints tend to log it.
        uri_query = without_params(query, [self.config.token_param or ""])
        uri = path + (f"?{uri_query}" if uri_query else "")
        key_query = without_params(uri_query, volatile_params)
        # Who and where the client is, as for proxied requests (trusted peers'
        # chains extended, anyone else's claims replaced).
        identity = [(n, v) for n, v in request_headers if n.lower() in _IDENTITY_INPUT]
        where = [
            (name, value)
            for name, value in forwarded_headers(
                identity, peer_ip=peer_ip, scheme=scheme, trusted=peer_ip in self.trusted
            )
            if name.lower() != b"host"
        ]
        # Without a credential, the client's address is all the endpoint can
        # decide by (admitting an internal network, say): it is part of the
        # key then, or one address's admit would be served to everyone. With a
        # credential it is not, so one user's tabs on several networks (or
        # behind a changing NAT address) still share one decision.
        key = self._key(sent if sent else where, path + (f"?{key_query}" if key_query else ""))
        context: list[Header] = [
            (b"X-Forwarded-Method", b"GET"),
            (b"X-Forwarded-Uri", uri.encode("utf-8", "replace")),
            *where,
        ]
        return Credential(key, tuple(sent + context))

    def _query_token(self, query: str) -> bytes | None:
        name = self.config.token_param
        if not name or name not in query:
            return None
        values = parse_qs(query, keep_blank_values=False).get(name)
        if not values:
            return None
        token = values[0]
        value = f"{self.config.token_scheme} {token}" if self.config.token_scheme else token
        # h11 refuses CR, LF, NUL and edge whitespace in header values; such a
        # "token" is no credential and is not forwarded.
        if value != value.strip() or any(c in value for c in "\r\n\x00"):
            return None
        return value.encode("utf-8")

    def _key(self, sent: Sequence[Header], uri: str) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for name, value in sent:
            # Length-prefixed, so ("a", "bc") and ("ab", "c") can't collide.
            for part in (name.lower(), value):
                mac.update(len(part).to_bytes(4, "big"))
                mac.update(part)
        encoded = uri.encode("utf-8", "replace")
        mac.update(len(encoded).to_bytes(4, "big"))
        mac.update(encoded)
        return mac.digest()
