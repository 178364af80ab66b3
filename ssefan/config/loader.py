"""YAML configuration -> frozen, typed values, validated with key-path errors.

Every problem is collected and reported at once, each as "<file>:<line>: <key
path>: <what was expected>, got <what was there>", the line being the key's
(YAML syntax errors: "<file>: line L, column C").
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ssefan.config.reader import _Reader
from ssefan.config.schema import Config
from ssefan.config.sections import _read_config
from ssefan.config.syntax import _ConfigLoader, _where, _yaml_problem
from ssefan.config.values import _show


class ConfigError(ValueError):
    """The configuration is unusable. `problems` holds one readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a YAML config file. Raises ConfigError listing every problem."""
    source = os.fspath(path)
    try:
        data = Path(source).read_bytes()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError([f"{source}: cannot read the file: {reason}"]) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(
            [f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"]
        ) from None
    return parse_config(text, source)


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate YAML text; `source` names it in messages and becomes Config.source."""
    reader = _Reader(source)
    document = _parse_yaml(text, reader)
    config = _read_config(reader, document)
    if reader.problems or config is None:
        raise ConfigError(reader.problems)
    return config


def _parse_yaml(text: str, reader: _Reader) -> object:
    """The YAML document; a syntax error ends reading, a duplicate key is reported."""
    loader: _ConfigLoader | None = None
    try:
        # The constructor already reads the text (and refuses control characters).
        loader = _ConfigLoader(text)
        document: object = loader.get_single_data()
    except yaml.YAMLError as err:
        raise ConfigError([_yaml_problem(err, reader.source, text)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    reader.document = document
    for key, mark, first in sorted(loader.duplicates, key=lambda dup: dup[1].index):
        reader.report_at(
            mark,
            f"duplicate key {_show(key)} (first at {_where(first)});"
            " YAML would silently keep only the last one, so remove one of them",
        )
    return document
