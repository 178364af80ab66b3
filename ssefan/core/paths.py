"""How request paths are compared with route paths (shared by routing and config checks)."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["routing_path", "variant_path"]

# What `variant_path` removes: characters that don't show, which some app or
# framework strips, trims or ignores before routing. C0 controls and DEL (`%00`
# ends a C string; `%0a`, `%09` are trimmed as whitespace), C1 controls, soft
# hyphen, zero-width and bidi marks, word joiners and the BOM.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")


def routing_path(path: str) -> str:
    """`path` in the form requests are routed by: spellings apps treat alike, made one.

    A request whose path has this form in common with a route's is that route
    (the same forward-auth, the same stream); anything else is passed through
    as it came. Otherwise `/%65vents`, `/events/`, `//events`, `/events;x` or
    `/x/../events` would reach the app, whose framework decodes or cleans the
    path into `/events`: the expensive endpoint, past forward-auth. The rules,
    in order:

    1. Percent-escapes are decoded once, all of them: the unreserved ones are
       the same character (RFC 3986 §6.2.2.2), and frameworks decode the rest
       (`%2F`) too before routing. A backslash counts as `/` (some servers).
    2. `;params` are cut from every segment (Servlet containers do; `..;x` is `..`).
    3. Empty segments go: repeated `/` collapse, and a trailing `/` is the
       same route (as nginx's merge_slashes and Go's path.Clean).
    4. Dot-segments are resolved (RFC 3986 §5.2.4); `..` stops at the root.

    Matching more spellings than the app would is harmless (a stream route
    only answers GET/HEAD/OPTIONS, behind its own forward-auth); matching fewer
    is a bypass.
    """
    return _normalised(unquote(path, errors="replace"))


def variant_path(path: str) -> str:
    """`path` as the most lenient app would route it: for `protect_variants`.

    The routing form (see routing_path) of `path` with every invisible
    character removed (see _INVISIBLE) and case folded: what an app that
    routes case-insensitively, or cuts a path at a NUL, or trims whitespace,
    may take for the same route. A request path that is no route but has the
    same variant form as a route with `protect_variants` is refused (404)
    rather than passed through: `/EVENTS`, `/Events`, `/events%00`,
    `/events%0a`, `/ev%e2%80%8bents`. Case is folded with str.casefold, which
    also matches the long s (U+017F) with `s` and the Kelvin sign with `k`, as .NET's
    case-insensitive comparison does. Matching more than an app would costs a
    404 on a path nobody serves; matching less is a bypass.
    """
    visible = _INVISIBLE.sub("", unquote(path, errors="replace"))
    return _normalised(visible).casefold()


def _normalised(decoded: str) -> str:
    """Rules 1 (backslash) to 4 of routing_path, on an already decoded path."""
    segments: list[str] = []
    for segment in decoded.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)
