"""Value grammars shared by every section: units, durations, sizes, choices.

A converter takes the raw YAML value and returns the typed one or raises
_BadValue whose message says what was expected; _show and _kind write the
"got ..." part of every message.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable
from fractions import Fraction
from typing import TypeVar

SECONDS = 1.0
MINUTES = 60 * SECONDS
KiB = 1024
MiB = 1024 * KiB

_T = TypeVar("_T")

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


class _BadValue(ValueError):
    """One value has the wrong type, form or range; the message says what was expected."""


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


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hint = _did_you_mean(value, ("auto",))
        raise _BadValue(
            f'expected an integer >= 1 or "auto" (one per CPU), got {_show(value)}{hint}'
        )
    return value


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
