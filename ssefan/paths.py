"""How request paths are compared with route paths (shared by routing and config checks)."""

from __future__ import annotations

from urllib.parse import unquote

__all__ = ["routing_path"]


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
    segments: list[str] = []
    for segment in unquote(path, errors="replace").replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)
