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

from ssefan.config import Config
from ssefan.http.redaction import REDACTED, is_secret_param, redact

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

# A configured secret shorter than this is not searched for: replacing every
# "1" or "on" in every line would garble logs, and such a value protects nothing.
MIN_SECRET_LENGTH = 4
# Header names whose values are credentials (matched as substrings, lowercase).
_SECRET_HEADER_WORDS = ("auth", "token", "key", "secret", "cookie", "session", "password")
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
