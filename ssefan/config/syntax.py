"""YAML text -> a document whose mappings and sequences know their lines, and
PyYAML's syntax errors in plain words with what to change.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator

import yaml
from yaml.reader import ReaderError

from ssefan.config.values import _show


class _Mapping(dict[object, object]):
    """A YAML mapping that remembers the line (from 1) of itself and of each key,
    so a problem found while reading can name the line to edit."""

    __slots__ = ("key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[object, int] = {}


class _Sequence(list[object]):
    """A YAML sequence that remembers the line (from 1) of itself and of each item."""

    __slots__ = ("item_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []


class _ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader (same safety as yaml.safe_load) that also notes duplicate
    keys, which plain YAML loading resolves silently by keeping the last one, and
    builds mappings and sequences that remember their lines (_Mapping, _Sequence)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, yaml.Mark, yaml.Mark]] = []

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        first_seen: dict[tuple[str, str], yaml.Mark] = {}
        for key_node, _ in node.value:
            # `<<` merge keys may legitimately be overridden; only compare plain scalars.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            identity = (key_node.tag, key_node.value)
            if identity in first_seen:
                self.duplicates.append((key_node.value, key_node.start_mark, first_seen[identity]))
            else:
                first_seen[identity] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_marked_mapping(self, node: yaml.MappingNode) -> Iterator[_Mapping]:
        # A generator, like SafeConstructor.construct_yaml_map: the empty mapping
        # is handed out first so that aliases to it (even recursive ones) resolve.
        data = _Mapping(node.start_mark.line + 1)
        yield data
        data.update(self.construct_mapping(node))
        # construct_mapping has flattened `<<` merges into node.value, merged keys
        # first: the last node of each key is the one whose value the dict kept.
        for key_node, _ in node.value:
            data.key_lines[self.construct_object(key_node)] = key_node.start_mark.line + 1

    def construct_marked_sequence(self, node: yaml.SequenceNode) -> Iterator[_Sequence]:
        data = _Sequence(node.start_mark.line + 1)
        yield data
        data.extend(self.construct_sequence(node))
        data.item_lines.extend(item.start_mark.line + 1 for item in node.value)


_ConfigLoader.add_constructor("tag:yaml.org,2002:map", _ConfigLoader.construct_marked_mapping)
_ConfigLoader.add_constructor("tag:yaml.org,2002:seq", _ConfigLoader.construct_marked_sequence)


def _where(mark: yaml.Mark) -> str:
    # yaml marks count from 0; editors count from 1.
    return f"line {mark.line + 1}, column {mark.column + 1}"


def _yaml_problem(err: yaml.YAMLError, source: str, text: str) -> str:
    if isinstance(err, ReaderError) and isinstance(err.position, int):
        return f"{source}: {_text_position(text, err.position)}: invalid YAML: " + (
            _explain_reader_error(err) or str(err.reason)
        )
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem_mark is None:
        return f"{source}: invalid YAML: {err}"
    mark = err.problem_mark
    explained = _explain_yaml(err, mark, text.splitlines())
    if explained is None:
        # Not one we know: PyYAML's own words, still with where it happened.
        explained = err.problem or ""
        if err.context and err.context_mark is not None and err.context_mark != mark:
            explained += f" ({err.context} that started at {_where(err.context_mark)})"
    return f"{source}: {_where(mark)}: invalid YAML: {explained}"


def _text_position(text: str, index: int) -> str:
    """`_where` for an index into the text (a ReaderError carries no Mark)."""
    line = text.count("\n", 0, index) + 1
    column = index - (text.rfind("\n", 0, index) + 1) + 1
    return f"line {line}, column {column}"


def _explain_reader_error(err: ReaderError) -> str | None:
    code = err.character if isinstance(err.character, int) else None
    if code is None:
        return None
    # YAML 1.1 §5.1: only printable characters may appear in a YAML stream.
    return (
        f"the control character U+{code:04X} cannot appear in YAML: delete it"
        f' (inside double quotes it may be written as an escape, e.g. "\\x{code:02x}")'
        if code < 0x100
        else f"the character U+{code:04X} cannot appear in YAML: delete it"
    )


# Tokens PyYAML names in "expected <block end>, but found X" when a line starts
# at an indentation that no open mapping or list has.
_LINE_START_TOKENS = (
    "'<block mapping start>'",
    "'<block sequence start>'",
    "'<scalar>'",
    "'?'",
    "'<alias>'",
    "'<anchor>'",
    "'<tag>'",
)
_INDENT_HINT = "indent each key of a mapping by the same number of spaces (no tabs)"


def _explain_yaml(err: yaml.MarkedYAMLError, mark: yaml.Mark, lines: list[str]) -> str | None:
    """PyYAML's complaint in plain words, with what to change; None if not a known one."""
    problem, context, start = err.problem or "", err.context or "", err.context_mark
    line = _line(lines, mark)
    started = f" at {_where(start)}" if start is not None else ""
    opening = _line(lines, start)[start.column : start.column + 1] if start is not None else ""
    if "'\\t'" in problem:
        return "a tab character: YAML does not allow tabs for indentation; indent with spaces"
    if re.match(r"\s*[\w-]+:\s*\[[0-9A-Fa-f:.]*\]:", line):
        return (
            'a value that starts with "[" is a list in YAML:'
            ' quote bracketed IPv6 addresses, e.g. listen: "[::1]:8080"'
        )
    if problem == "mapping values are not allowed here":
        return _explain_colon(mark, line, lines)
    if problem.startswith("expected <block end>, but found "):
        return _explain_block_end(problem, mark, line, lines, start)
    if context in ("while parsing a flow sequence", "while parsing a flow mapping"):
        kind, close = ("list", "]") if "sequence" in context else ("mapping", "}")
        if problem.endswith("'<stream end>'"):
            return (
                f'the {kind} opened with "{opening}"{started} is never closed:'
                f' end it with "{close}"'
            )
        return (
            f'the {kind} opened with "{opening}"{started} is not closed where expected:'
            f' separate its items with "," and end it with "{close}";'
            ' quote items that contain ": " or " #"'
        )
    if problem == "expected the node content, but found '<stream end>'":
        return (
            "the file ends where a value was expected:"
            ' close the "[" or "{" opened above, or finish the value'
        )
    if context == "while scanning a quoted scalar":
        return (
            f"the quoted value that starts with {opening}{started} has no closing {opening}:"
            f" add {opening} at the end of the value"
        )
    escape = re.fullmatch(r"found unknown escape character '(.*)'", problem)
    if escape:
        return (
            f'inside double quotes "\\" starts an escape and "\\{escape[1]}" is not one:'
            ' put the value in single quotes instead, or write each "\\" as "\\\\"'
        )
    if context in ("while scanning an alias", "while scanning an anchor"):
        sign, name = (
            ("*", "an alias (a reference to an anchor)")
            if "alias" in context
            else ("&", "an anchor")
        )
        return (
            f'"{sign}" at the start of a value makes it {name} in YAML:'
            f' quote the value, e.g. "{sign}"'
        )
    alias = re.fullmatch(r"found undefined alias '(.*)'", problem)
    if alias:
        return (
            f'"*{alias[1]}" refers to an anchor "&{alias[1]}" that is not defined above it:'
            f' define the anchor first, or quote the value if "*" is meant literally'
        )
    anchor = re.fullmatch(r"found duplicate anchor '(.*)'; first occurrence", context)
    if anchor:
        return (
            f'the anchor "&{anchor[1]}" is defined twice (first{started}):'
            " give each anchor its own name"
        )
    reserved = re.fullmatch(r"found character '(.)' that cannot start any token", problem)
    if reserved:
        return (
            f'a value cannot start with "{reserved[1]}" in YAML (it is reserved): quote the value'
        )
    if context == "while scanning a simple key" and start is not None:
        text = _line(lines, start).strip()
        return (
            f'line {start.line + 1} ({_show(text)}) has no ":" after its key:'
            ' write it as "key: value", or "key:" with the value indented on the lines below'
        )
    if context == "expected a single document in the stream":
        return 'a second YAML document starts here ("---"): keep one document in the file'
    tag = re.fullmatch(r"could not determine a constructor for the tag '(.*)'", problem)
    if tag:
        shown = tag[1].replace("tag:yaml.org,2002:", "!!")
        return (
            f"the tag {_show(shown)} asks for an object, not plain data, and ssefan reads"
            " plain data only (YAML safe loading): remove the tag"
        )
    if problem == "found unhashable key":
        return 'a list or mapping is used as a key: keys are plain names, like "path"'
    if context == "while scanning a block scalar":
        return (
            'only "+", "-" or an indentation digit may follow "|" or ">" on its line:'
            " start the text on the next line, or quote the value"
        )
    return None


def _line(lines: list[str], mark: yaml.Mark) -> str:
    # A mark may sit just past the last line (the end of the stream).
    return lines[mark.line] if mark.line < len(lines) else ""


def _key_column(line: str) -> int:
    """Where a line's key starts: after its indentation and any "- " list markers."""
    match = re.match(r"(?:[ ]*-[ ]+)*[ ]*", line)
    return match.end() if match else 0


def _line_above(lines: list[str], index: int) -> int | None:
    """The nearest line above `index` that holds something other than a comment."""
    for above in range(min(index, len(lines)) - 1, -1, -1):
        content = lines[above].strip()
        if content and not content.startswith("#"):
            return above
    return None


def _explain_colon(mark: yaml.Mark, line: str, lines: list[str]) -> str:
    # ": " where YAML is reading a value. Three usual causes: the value itself
    # holds ": "; the line is indented deeper than its key, so it continues the
    # value above; or the line above lacks its ":", so both are one text.
    before = line[: mark.column]
    if re.search(r":\s", before):
        key, _, value = line.strip().partition(": ")
        value = value.split(" #")[0].strip()
        quoted = f"'{value}'" if '"' in value else f'"{value}"'
        return (
            f'this value contains ": ", which YAML reads as the start of another key:'
            f" put the value in quotes, e.g. {key}: {quoted}"
        )
    above = _line_above(lines, mark.line)
    if above is not None and _key_column(line) > _key_column(lines[above]):
        return (
            f"this line is indented deeper than the key on line {above + 1}, so YAML reads it"
            f" as more of that key's value: {_INDENT_HINT}"
        )
    if above is not None and not re.search(r":(\s|$)", lines[above]):
        return (
            f'line {above + 1} has no ":" after its key, so YAML reads it and this line as'
            ' one text: write it as "key: value"'
        )
    return (
        f'a key (": ") is not allowed here: quote the value if it contains ": ", and {_INDENT_HINT}'
    )


def _explain_block_end(
    problem: str, mark: yaml.Mark, line: str, lines: list[str], start: yaml.Mark | None
) -> str | None:
    found = problem.removeprefix("expected <block end>, but found ")
    opened = _line(lines, start)[start.column :] if start is not None else ""
    if found == "'-'":
        if start is not None and re.match(r"-[^\s-]", opened):
            return (
                f"line {start.line + 1} starts with {_show(opened.split(':')[0])},"
                ' which YAML reads as a key: put a space after "-" to make it a list item'
            )
        return (
            'a list item ("- ") where a key was expected: a list must be the value of a key,'
            ' indented under "key:"'
        )
    at_line_start = mark.column in (len(line) - len(line.lstrip(" ")), _key_column(line))
    if found in _LINE_START_TOKENS and at_line_start:
        spaces = len(line) - len(line.lstrip(" "))
        return (
            f"the indentation of this line ({spaces} space{'' if spaces == 1 else 's'})"
            f" does not match the lines above it: {_INDENT_HINT}"
        )
    if found == "'<scalar>'" and re.search(r"[\"']\s*$", line[: mark.column]):
        return "text follows the closing quote of a value: put the whole value inside the quotes"
    if found in ("']'", "'}'"):
        bracket = found[1]
        return f'a "{bracket}" that closes nothing: remove it, or quote the value'
    return None
