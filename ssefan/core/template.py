r"""Route templates (`/jobs/{job}/progress`): parse, match, render, check. No I/O.

A template route serves one channel per distinct key. Keys come from the
request, so they are untrusted input; these are the rules:

- `{name}` (an ASCII identifier) is a whole path segment: `/a{x}b` is refused
  (where would the key end?). `/events?topic={topic}` takes the key from the
  query parameter `topic`; both forms may be mixed, each name used once.
- A path key is a segment of the request path in routing form (see
  paths.routing_path: decoded once, `;params` cut, dot-segments resolved),
  which the caller computes as the router does, so a template sees the path
  a static route would. It is not decoded again: `%252F` is the key `%2F`.
  A query key is the parameter's value decoded once (`+` is a space),
  strictly as UTF-8; a parameter given twice matches nothing (apps differ on
  which one wins), other parameters are ignored (clients add their own).
- A key must fully match its pattern (re.fullmatch, compiled with re.ASCII
  so `\w` and `\d` never match `é` or a fullwidth digit; by default
  DEFAULT_KEY_PATTERN) and, whatever the pattern, be none of: empty, `.`,
  `..`, or a string with `/`, `\`, `;`, a control or invisible character
  (paths.variant_path's set) or U+FFFD (what routing_path makes of non-UTF-8
  escapes). `quote` leaves dots alone and apps decode `%2F` before routing,
  so a permissive pattern must not reopen these; the rest would spoof logs
  and the status page.
- Rendering percent-encodes every key again with `quote(key, safe="")`,
  into the upstream URL's path and query and the route's upstream header
  values, so a key can change neither the upstream's host, its path's
  segments nor its query's parameters, and never puts CR/LF in a header.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus, unquote_to_bytes, urlsplit

from ssefan.core.paths import routing_path

__all__ = [
    "DEFAULT_KEY_PATTERN",
    "ChannelKey",
    "Placeholder",
    "RouteTemplate",
    "TemplateError",
    "UnsafeKey",
    "UpstreamTemplate",
    "is_template",
    "matches_static",
    "missing_placeholders",
    "overlaps",
    "parse_route",
    "parse_upstream",
]

# Ids people use for jobs, rooms and tenants (UUIDs, slugs, numbers); 64
# characters hold a UUID with a prefix, and nothing in it needs encoding.
DEFAULT_KEY_PATTERN = "[A-Za-z0-9_-]{1,64}"

# Refused in every key, whatever its pattern (see the module docstring).
_UNSAFE = re.compile(
    "[/\\\\;\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff\ufffd]"
)
_BRACES = re.compile(r"\{([^{}]*)\}")
# A query parameter name in a route template: unreserved characters (RFC 3986
# §2.3), which read the same decoded or not.
_PARAM = re.compile(r"[A-Za-z0-9._~-]+")

# The canonical value of a match: (name, key) in template order; hashable.
ChannelKey = tuple[tuple[str, str], ...]


class TemplateError(ValueError):
    """A route or upstream template that cannot be used; the text says why."""


class UnsafeKey(ValueError):
    """A key that no match yields was given to render (a caller's bug)."""


@dataclass(frozen=True, slots=True)
class Placeholder:
    name: str
    pattern: re.Pattern[str]

    def accepts(self, key: str) -> bool:
        """The key rules of the module docstring."""
        return self.pattern.fullmatch(key) is not None and _safe(key)


@dataclass(frozen=True, slots=True)
class RouteTemplate:
    source: str  # as configured, e.g. "/t/{tenant}/rooms/{room}"
    segments: tuple[str | Placeholder, ...]  # the path's, after the leading "/"
    params: tuple[tuple[str, Placeholder], ...]  # (query parameter, placeholder)
    names: tuple[str, ...]  # every placeholder, path first, in order

    def match(self, path: str, query: str = "") -> dict[str, str] | None:
        """The keys of a request, or None. `path` in routing form, `query` as sent."""
        keys = self._match_path(path)
        if keys is None or not self.params:
            return keys
        wanted = dict(self.params)
        for item in query.split("&") if query else ():
            param, _, value = item.partition("=")
            slot = wanted.get(unquote_plus(param, errors="replace"))
            if slot is None:
                continue
            if slot.name in keys:
                return None  # given twice
            try:
                key = unquote_to_bytes(value.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                return None
            if not slot.accepts(key):
                return None
            keys[slot.name] = key
        if len(keys) != len(self.names):
            return None
        return {name: keys[name] for name in self.names}

    def _match_path(self, path: str) -> dict[str, str] | None:
        if not path.startswith("/"):
            return None
        parts = path[1:].split("/") if path != "/" else []
        if len(parts) != len(self.segments):
            return None
        keys: dict[str, str] = {}
        for part, segment in zip(parts, self.segments, strict=True):
            if isinstance(segment, str):
                if part != segment:
                    return None
            elif segment.accepts(part):
                keys[segment.name] = part
            else:
                return None
        return keys

    def claims(self, path: str, *, fold: bool = False) -> bool:
        """Whether `path` (routing form) is this template's even with a refused key.

        True when the literal segments before the first placeholder and after
        the last match, however many segments lie between (`/jobs/a/b/progress`,
        from `a%2Fb`, too): such a request is answered 404, never passed
        through to the app, so no key that was refused reaches it another way.
        `fold`: `path` is a variant form (paths.variant_path, case folded), and
        the literals are compared case folded too.
        """
        if not path.startswith("/"):
            return False
        parts = path[1:].split("/") if path != "/" else []
        literals = [s.casefold() if fold and isinstance(s, str) else s for s in self.segments]
        first = next((i for i, s in enumerate(literals) if not isinstance(s, str)), None)
        if first is None:  # placeholders in the query only: the path is all literal
            return parts == literals
        last = max(i for i, s in enumerate(literals) if not isinstance(s, str))
        suffix = len(literals) - last - 1
        return (
            len(parts) >= len(literals)
            and parts[:first] == literals[:first]
            and parts[len(parts) - suffix :] == literals[last + 1 :]
        )

    def channel_key(self, keys: Mapping[str, str]) -> ChannelKey:
        return tuple((name, keys[name]) for name in self.names)

    def display(self, keys: Mapping[str, str]) -> str:
        """The concrete request path, keys encoded: for logs and the status page."""
        path = "/" + "/".join(
            s if isinstance(s, str) else quote(keys[s.name], safe="") for s in self.segments
        )
        if not self.params:
            return path
        return path + "?" + "&".join(f"{p}={quote(keys[s.name], safe='')}" for p, s in self.params)


@dataclass(frozen=True, slots=True)
class UpstreamTemplate:
    # Each text split at its placeholders: literal, name, literal, ..., literal.
    url: tuple[str, ...]
    headers: tuple[tuple[str, tuple[str, ...]], ...]
    names: tuple[str, ...]  # every placeholder used, in order of first use

    def render_url(self, keys: Mapping[str, str]) -> str:
        """The concrete URL; KeyError for a missing key, UnsafeKey for a refused one."""
        return _render(self.url, keys)

    def render_headers(self, keys: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple((name, _render(pieces, keys)) for name, pieces in self.headers)


def is_template(path: str) -> bool:
    """Whether a configured route path is meant as a template (has a brace)."""
    return "{" in path or "}" in path


def parse_route(
    path: str, *, pattern: str = DEFAULT_KEY_PATTERN, patterns: Mapping[str, str] | None = None
) -> RouteTemplate:
    """A route template; `patterns` overrides `pattern` for some names."""
    patterns = patterns or {}
    if not path.startswith("/") or "#" in path:
        raise TemplateError(f'expected a path starting with "/" and without #, got {path!r}')
    path_part, has_query, query_part = path.partition("?")
    names = _split(path, "the path")[1::2]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise TemplateError(f"{{{twice}}} is used twice in {path!r}; each key needs its own name")
    if not names:
        raise TemplateError(f"{path!r} has no {{placeholder}}: a static route, not a template")
    unknown = sorted(set(patterns) - set(names))
    if unknown:
        raise TemplateError(f"key patterns for {unknown} name no placeholder of {path!r}")
    slots = {name: Placeholder(name, _compile(patterns.get(name, pattern))) for name in names}
    form = routing_path(path_part)
    if form != path_part:
        same = _BRACES.findall(form) == _BRACES.findall(path_part)
        raise TemplateError(
            f"{path_part!r} is not in the form requests are matched in (after"
            ' normalising "/", "//", ".", ";" and percent-escapes): '
            + (f"write {form!r}" if same else "its placeholders would not survive it")
        )
    segments: list[str | Placeholder] = []
    for segment in path_part[1:].split("/") if path_part != "/" else ():
        whole = _BRACES.fullmatch(segment)
        if whole is not None:
            segments.append(slots[whole[1]])
        elif "{" in segment:
            raise TemplateError(
                f"a placeholder must be a whole path segment, like /a/{{x}}/b,"
                f" but {segment!r} in {path!r} has more around it"
            )
        else:
            segments.append(segment)
    params: list[tuple[str, Placeholder]] = []
    for item in query_part.split("&") if has_query else ():
        param, _, value = item.partition("=")
        whole = _BRACES.fullmatch(value)
        if _PARAM.fullmatch(param) is None or whole is None:
            raise TemplateError(
                f"expected the query of {path!r} as param={{name}} pairs joined by &,"
                f" like ?topic={{topic}}, got {item!r}"
            )
        if param in dict(params):
            raise TemplateError(f"query parameter {param!r} is used twice in {path!r}")
        params.append((param, slots[whole[1]]))
    return RouteTemplate(path, tuple(segments), tuple(params), tuple(names))


def parse_upstream(url: str, headers: Sequence[tuple[str, str]] = ()) -> UpstreamTemplate:
    """An upstream URL and header values with placeholders (path and query only)."""
    pieces = _split(url, "the upstream URL")
    parts = urlsplit(url)
    head = f"{parts.scheme}://{parts.netloc}"
    if not parts.scheme or not url.startswith(head) or "{" in head + parts.fragment:
        raise TemplateError(
            "keys may only fill in the path and query of an upstream URL, never"
            f" choose where it connects: {url!r} has one in its scheme, host or #"
        )
    rendered: list[tuple[str, tuple[str, ...]]] = []
    for name, value in headers:
        if is_template(name):
            raise TemplateError(f"header name {name!r} has a brace: only values take keys")
        rendered.append((name, _split(value, f"header {name}")))
    names = [*pieces[1::2], *(n for _, p in rendered for n in p[1::2])]
    return UpstreamTemplate(pieces, tuple(rendered), tuple(dict.fromkeys(names)))


def missing_placeholders(route: RouteTemplate, upstream: UpstreamTemplate) -> tuple[str, ...]:
    """The names the upstream uses that the route's path does not define."""
    return tuple(name for name in upstream.names if name not in route.names)


def overlaps(a: RouteTemplate, b: RouteTemplate) -> bool:
    """Whether some request could match both (`check` refuses such pairs).

    Conservative: paths of as many segments whose segments pair up as equal
    literals, a literal the other's placeholder accepts, or two placeholders
    (patterns are not intersected). Query parameters are not compared: other
    parameters are ignored when matching, so `/events?topic={t}` and
    `/events?room={r}` both match `/events?topic=1&room=2`.
    """
    if len(a.segments) != len(b.segments):
        return False
    return all(_can_be_same(x, y) for x, y in zip(a.segments, b.segments, strict=True))


def matches_static(template: RouteTemplate, static_path: str) -> bool:
    """Whether a static route's path is one the template's path matches.

    Allowed (the static route wins, being more specific). For a template with
    query placeholders it means the static route takes every request the
    template would have had, which `check` may want to say.
    """
    return template._match_path(routing_path(static_path)) is not None


def _can_be_same(x: str | Placeholder, y: str | Placeholder) -> bool:
    if isinstance(x, str):
        return x == y if isinstance(y, str) else y.accepts(x)
    return isinstance(y, Placeholder) or x.accepts(y)


def _safe(key: str) -> bool:
    return key not in ("", ".", "..") and _UNSAFE.search(key) is None


def _split(text: str, what: str) -> tuple[str, ...]:
    """`text` as literal, name, literal, ..., literal; TemplateError for bad braces."""
    pieces = _BRACES.split(text)
    for literal in pieces[0::2]:
        if "{" in literal or "}" in literal:
            raise TemplateError(f"unbalanced braces in {what}: {text!r}")
    for name in pieces[1::2]:
        if not (name.isidentifier() and name.isascii()):
            raise TemplateError(
                f"{{{name}}} in {what} {text!r}: a placeholder's name must be"
                " an identifier, like {job} or {room_id}"
            )
    return tuple(pieces)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.ASCII)
    except re.error as err:
        raise TemplateError(f"key pattern {pattern!r} is not a regular expression: {err}") from None


def _render(pieces: tuple[str, ...], keys: Mapping[str, str]) -> str:
    out = [pieces[0]]
    for index in range(1, len(pieces), 2):
        key = keys[pieces[index]]
        if not _safe(key):
            raise UnsafeKey(f"key {key!r} for {{{pieces[index]}}} is one no template matches")
        out.append(quote(key, safe=""))
        out.append(pieces[index + 1])
    return "".join(out)
