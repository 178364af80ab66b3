"""Log lines for journald and humans: key=value or JSON, one line each, no secrets.

* `text` (default): `level=info logger=ssefan msg="..."`, logfmt style. Under
  journald (stderr is the journal stream named in $JOURNAL_STREAM) the line
  starts with a `<N>` syslog priority, so `journalctl -p warning` filters by
  level, and the timestamp is left to the journal.
* `json`: one JSON object per line, the same fields.

Every line passes through a `Redactor` first: values of credential headers
from the config (known secrets, replaced wherever they appear), then
`redact()`: credentials in URLs (user:password@, credential parameters in a
query string or fragment, percent-encoded or not) and `Bearer` / `Basic`
tokens. `redact()` is the one function for every printer of a URL (log lines,
`ssefan check`); it is the last line of defence, and code still never logs
headers.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Iterable
from urllib.parse import unquote_plus

from .config import Config

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "KeyValueFormatter",
    "Redactor",
    "configure",
    "current_options",
    "is_secret_param",
    "redact",
    "remember_secrets",
]

LOG_FORMATS = ("text", "json")
REDACTED = "***"

# A configured secret shorter than this is not searched for: replacing every
# "1" or "on" in every line would garble logs, and such a value protects nothing.
MIN_SECRET_LENGTH = 4
# Header names whose values are credentials (matched as substrings, lowercase).
_SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "cookie", "session", "password")
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

# syslog priorities (sd-daemon.h SD_ERR ... SD_DEBUG) for journald's line prefix.
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}
# LogRecord attributes that are not extra fields given with `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_BARE_VALUE = re.compile(r"[^\s\"=\\]+")


class Redactor:
    """Replaces known secrets and credential-looking patterns with ***."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()

    def add(self, secrets: Iterable[str]) -> None:
        # Kept across reloads: a line about the old config must stay clean too.
        self._secrets.update(s for s in secrets if len(s) >= MIN_SECRET_LENGTH)

    def __call__(self, text: str) -> str:
        # Longest first, so a secret that contains another is replaced whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, REDACTED)
        return redact(text)


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


def config_secrets(config: Config) -> list[str]:
    """Values in the config that must never appear in a log line."""
    secrets: list[str] = []
    for route in config.routes:
        for name, value in route.upstream.headers:
            if any(word in name.lower() for word in _SECRET_HEADER_WORDS):
                secrets.append(value)
                # "Bearer abc": the token alone may be logged by someone else.
                secrets.extend(value.split()[1:])
    return secrets


class _Formatter(logging.Formatter):
    def __init__(self, *, journald: bool = False, fields: dict[str, str] | None = None) -> None:
        super().__init__()
        self.journald = journald
        self.fields = dict(fields or {})  # e.g. worker=1 on every line of a worker
        self.redact = Redactor()

    def _items(self, record: logging.LogRecord) -> dict[str, object]:
        items: dict[str, object] = {}
        if not self.journald:
            stamp = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
            items["ts"] = stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        items["level"] = record.levelname.lower()
        items["logger"] = record.name
        items.update(self.fields)
        items["msg"] = self.redact(record.getMessage())
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                items[key] = self.redact(str(value)) if isinstance(value, str) else value
        if record.exc_info:
            items["exc"] = self.redact(self.formatException(record.exc_info))
        elif record.stack_info:
            items["stack"] = self.redact(self.formatStack(record.stack_info))
        return items

    def _prefix(self, record: logging.LogRecord) -> str:
        if not self.journald:
            return ""
        return f"<{_PRIORITY.get(record.levelno, 6)}>"


class KeyValueFormatter(_Formatter):
    """logfmt: key=value pairs, values quoted when they hold spaces or quotes."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={_logfmt(v)}" for k, v in self._items(record).items())
        return self._prefix(record) + pairs


class JsonFormatter(_Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = json.dumps(self._items(record), ensure_ascii=False, default=str)
        return self._prefix(record) + line


def _logfmt(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    if text and _BARE_VALUE.fullmatch(text):
        return text
    # JSON string escaping keeps the line one line (\n, \t, quotes, controls).
    return json.dumps(text, ensure_ascii=False)


def _journald_stderr() -> bool:
    """Is stderr the journal stream systemd connected (systemd.exec(5) $JOURNAL_STREAM)?"""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in expected:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure(level: str, log_format: str = "text", fields: dict[str, str] | None = None) -> None:
    """Log at `level` and above to stderr, one line per record, in `log_format`."""
    logging.basicConfig(level=level.upper(), stream=sys.stderr)
    cls = JsonFormatter if log_format == "json" else KeyValueFormatter
    formatter = cls(journald=_journald_stderr(), fields=fields)
    for handler in _our_handlers():
        handler.setFormatter(formatter)


def _our_handlers() -> list[logging.Handler]:
    # basicConfig's handler writes to sys.stderr; a test runner's capture
    # handlers on the root logger are left as they are.
    return [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    ]


def _formatters() -> list[_Formatter]:
    return [h.formatter for h in _our_handlers() if isinstance(h.formatter, _Formatter)]


def remember_secrets(config: Config) -> None:
    """Teach every ssefan formatter the secrets of `config` (called on load and reload)."""
    secrets = config_secrets(config)
    for formatter in _formatters():
        formatter.redact.add(secrets)


def current_options() -> list[str]:
    """`--log-level` / `--log-format` arguments that reproduce the current setup
    (a supervisor starts its workers with them)."""
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    formats = _formatters()
    log_format = "json" if formats and isinstance(formats[0], JsonFormatter) else "text"
    return ["--log-level", level, "--log-format", log_format]
