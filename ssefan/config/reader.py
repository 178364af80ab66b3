"""Reading a parsed document: problems collected with file, line and key path,
sections read key by key with unknown keys reported (did you mean ...?).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from typing import TypeVar

import yaml

from ssefan.config.syntax import _Mapping, _Sequence, _where
from ssefan.config.values import _BadValue, _show

_T = TypeVar("_T")

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


# One step of a key path as _join and the list readers write it: `.key` (or a
# leading `key`), `["quoted key"]` (JSON), or `[index]`.
_PATH_STEP = re.compile(
    r'\.?(?P<key>[A-Za-z_][A-Za-z0-9_-]*)|\[(?P<index>[0-9]+)\]|\[(?P<quoted>"(?:[^"\\]|\\.)*")\]'
)


class _Reader:
    """Collects problems while the document is read, naming file, line and key path."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        # The parsed document, whose _Mapping/_Sequence values know their lines.
        self.document: object = None

    def report(self, path: str, message: str, *, at: str | None = None) -> None:
        """`source:line: path: message`; the line is that of `at` (default: `path`)."""
        line = self.line_of(path if at is None else at)
        where = self.source if line is None else f"{self.source}:{line}"
        self.problems.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")

    def report_at(self, mark: yaml.Mark, message: str) -> None:
        """A problem at a place in the text rather than at a key path."""
        self.problems.append(f"{self.source}: {_where(mark)}: {message}")

    def line_of(self, path: str) -> int | None:
        """The line of the key or item at `path`; for one that is not in the file
        (a missing key), the line of the nearest enclosing key or item that is."""
        node = self.document
        line = node.line if isinstance(node, _Mapping | _Sequence) else None
        position = 0
        while position < len(path):
            step = _PATH_STEP.match(path, position)
            if step is None:
                break
            position = step.end()
            if isinstance(node, _Sequence) and step["index"] is not None:
                index = int(step["index"])
                if index >= len(node.item_lines):
                    break
                line, node = node.item_lines[index], node[index]
            elif isinstance(node, _Mapping) and step["index"] is None:
                found = _key_named(node, step["key"] or json.loads(step["quoted"]))
                if found is None:
                    break
                line, node = node.key_lines[found[0]], node[found[0]]
            else:
                break
        return line

    def section(
        self,
        raw: object,
        path: str,
        keys: tuple[str, ...],
        expected: str,
        misplaced: dict[str, str] | None = None,
    ) -> _Section | None:
        """The mapping at `path`, with unknown keys reported; None if not a mapping."""
        if not isinstance(raw, dict):
            self.report(path, f"expected {expected}, got {_show(raw)}")
            return None
        for key in raw:
            if key not in keys:
                self.report(_join(path, str(key)), _unknown_key(str(key), keys, misplaced or {}))
        return _Section(self, path, raw)


class _Section:
    """One YAML mapping being read: values are converted field by field, and a
    bad one is reported and replaced by its default so reading goes on."""

    def __init__(self, reader: _Reader, path: str, values: dict[object, object]) -> None:
        self.reader = reader
        self.path = path
        self.values = values

    def path_of(self, key: str) -> str:
        return _join(self.path, key)

    def get(self, key: str, convert: Callable[[object], _T], default: _T) -> _T:
        if key not in self.values:
            return default
        try:
            return convert(self.values[key])
        except _BadValue as err:
            self.reader.report(self.path_of(key), str(err))
            return default

    def require(self, key: str, convert: Callable[[object], _T], expected: str) -> _T | None:
        if key not in self.values:
            self.reader.report(self.path_of(key), f"missing; expected {expected}")
            return None
        try:
            return convert(self.values[key])
        except _BadValue as err:
            self.reader.report(self.path_of(key), str(err))
            return None

    def nested(
        self, key: str, read: Callable[[_Reader, object, str], _T | None], default: _T
    ) -> _T:
        """A sub-section; absent or null means the default."""
        raw = self.values.get(key)
        if raw is None:
            return default
        value = read(self.reader, raw, self.path_of(key))
        return default if value is None else value


def _key_named(mapping: _Mapping, name: str) -> tuple[object] | None:
    """The key _join wrote as `name` (it writes keys with str(): `8080:` is "8080"),
    in a 1-tuple so that a null key is told apart from no key."""
    if name in mapping.key_lines:
        return (name,)
    return next(((key,) for key in mapping.key_lines if str(key) == name), None)


def _join(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        return f"{path}[{json.dumps(key, ensure_ascii=False)}]"
    return f"{path}.{key}" if path else key


def _unknown_key(key: str, keys: tuple[str, ...], misplaced: dict[str, str]) -> str:
    if key in misplaced:
        return f"unknown key here; {misplaced[key]}"
    close = difflib.get_close_matches(key, keys, n=1)
    if close:
        return f'unknown key; did you mean "{close[0]}"?'
    return f"unknown key; expected one of: {', '.join(keys)}"


def _written(key: str, section: _Section, other: str) -> str:
    """`key` if the file sets it, else `other`: the line a cross-check points at."""
    return key if key in section.values else other
