"""Credentials out of printed URLs and auth header values: the one redaction.

`redact()` replaces user:password@, credential parameters in query strings
and fragments (percent-encoded or not, see `is_secret_param`) and `Bearer` /
`Basic` / `Token` values with ***. Every printer of a URL or request target
uses it: log lines (through ops.logs' Redactor), `ssefan check`, status pages.
Pure functions: no logging, no state.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus

__all__ = ["REDACTED", "is_secret_param", "redact"]

REDACTED = "***"

# Which query/fragment parameter names carry credentials. Three tests, so that
# `key` catches `api_key` and `AWSAccessKeyId` but not `keyword` or `monkey`:
# 1. the whole name, for names too short or too common to look for inside
#    others: OAuth's `code` (RFC 6749 §4.1.2), `jwt`, `sig`, CAS's `ticket`;
_SECRET_NAMES = frozenset({"code", "jwt", "sig", "ticket", "assertion"})
# 2. a word of the name (split at `_`, `-`, `.` and camelCase humps);
_SECRET_WORDS = frozenset(
    {
        "key",
        "keys",
        "auth",
        "authn",
        "authz",
        "authorization",
        "oauth",
        "sig",
        "pwd",
        "pass",
        "otp",
        "totp",
        "hotp",
        "mfa",
        "sid",
        "hmac",
        "verifier",  # PKCE's code_verifier (RFC 7636), OAuth 1's oauth_verifier
        "saml",  # SAMLResponse: a signed assertion, as good as a password
        "assertion",
        "code",  # auth_code, otp_code; a bare `code` is in _SECRET_NAMES
    }
)
# 3. a substring of the name without separators, for stems distinctive
#    enough: access_token, X-Amz-Security-Token, X-Amz-Signature,
#    X-Amz-Credential, client_secret, apikey, PHPSESSID.
_SECRET_STEMS = (
    "token",
    "secret",
    "passw",
    "passphrase",
    "signature",
    "credential",
    "apikey",
    "accesskey",
    "privatekey",
    "session",
    "sessid",
    "jwt",
)
# Names that pass a test above yet are known to carry nothing secret, compared
# without separators and case: RFC 6749 §5.1's token_type ("bearer"), and the
# common `*_code`s that are not auth codes.
_HARMLESS_NAMES = frozenset(
    {
        "tokentype",
        "errorcode",
        "statuscode",
        "responsecode",
        "exitcode",
        "httpcode",
        "countrycode",
        "languagecode",
        "langcode",
        "currencycode",
        "zipcode",
        "postalcode",
    }
)
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
# A parameter in a URL inside free text: `?`, `&`, `;` (old-style separator)
# or `#` (the OAuth implicit flow puts `access_token=` in the fragment), a
# name, `=` and a value up to the next separator, whitespace or quote. `?` ends
# a value too, so `?next=/a?code=x` exposes no code.
_PARAM = re.compile(r"(?P<lead>[?&;#])(?P<name>[^=?&;#\s\"'<>]{1,200})=(?P<value>[^?&;#\s\"'<>]*)")
# The same with the `=` percent-encoded, once or more (`%3D`, `%253D`): a URL
# carried in another URL's parameter (`?redirect_uri=...%3Fcode%3Dabc`).
_ENC = "%(?:25)*"
_ENCODED_PARAM = re.compile(
    rf"(?i)(?P<lead>[?&;#]|{_ENC}(?:3F|26|23|3B))"
    rf"(?P<name>(?:[^=?&;#%\s\"'<>]|%(?!(?:25)*(?:3D|26|23|3B|3F))[0-9A-F]{{2}}){{1,200}})"
    rf"(?P<eq>{_ENC}3D)"
    rf"(?P<value>(?:[^?&;#%\s\"'<>]|%(?!(?:25)*(?:26|23|3B|3F))[0-9A-F]{{2}})*)"
)
# Punctuation that ends a sentence rather than a value: "(see ?key=abc)." keeps ")."
_TRAILING = ").,:!]}"
_URL_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/@\s\"']+@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic|token)(\s+)[A-Za-z0-9._~+/=-]{4,}")


def is_secret_param(name: str) -> bool:
    """Is a query or fragment parameter of this name (percent-encoded or not)
    a credential? `access_token`, `X-Amz-Signature`, `code`: yes;
    `topic`, `last_event_id`, `keyword`: no."""
    for _ in range(3):  # %255F is an underscore encoded twice
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    lower = name.strip().lower()
    compact = re.sub(r"[^a-z0-9]", "", lower)
    if compact in _HARMLESS_NAMES:
        return False
    if lower in _SECRET_NAMES:
        return True
    if any(word.lower() in _SECRET_WORDS for word in _NAME_WORDS.findall(name)):
        return True
    return any(stem in compact for stem in _SECRET_STEMS)


def redact(text: str) -> str:
    """`text` with every credential in a URL or auth header value it holds
    replaced by ***: user:password@, credential parameters in query strings
    and fragments (see `is_secret_param`), `Bearer`/`Basic` tokens.

    The one redaction for every printer of a URL or request target: log
    lines, `ssefan check`, status pages."""
    text = _URL_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _PARAM.sub(_redact_param, text)
    text = _ENCODED_PARAM.sub(_redact_param, text)
    return _AUTH_SCHEME.sub(rf"\1\2{REDACTED}", text)


def _redact_param(match: re.Match[str]) -> str:
    value = match["value"]
    secret = value.rstrip(_TRAILING)
    if not secret or secret == REDACTED or not is_secret_param(match["name"]):
        return match[0]
    eq = match.groupdict().get("eq") or "="
    return f"{match['lead']}{match['name']}{eq}{REDACTED}{value[len(secret) :]}"
