"""Route templates: parsing, matching hostile keys, re-encoding into the upstream, checks.

Requests are matched the way the router will: the raw path through
routing_path first, the query as sent.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ssefan.core.paths import routing_path
from ssefan.core.template import (
    DEFAULT_KEY_PATTERN,
    RouteTemplate,
    TemplateError,
    UnsafeKey,
    UpstreamTemplate,
    is_template,
    matches_static,
    missing_placeholders,
    overlaps,
    parse_route,
    parse_upstream,
)

JOBS = parse_route("/jobs/{job}/progress")
# What someone might configure who wants "anything": the key rules that hold
# whatever the pattern still apply, and rendering must stay safe regardless.
PERMISSIVE = parse_route("/jobs/{job}/progress", pattern=".{1,64}")
ANYTHING = parse_route("/jobs/{job}/progress", pattern="(?s).*")
UPSTREAM_URL = "http://127.0.0.1:8000/jobs/{job}/progress?key={job}&v=1"
UPSTREAM = parse_upstream(UPSTREAM_URL, [("X-Job", "job {job}")])


def request(template: RouteTemplate, target: str) -> dict[str, str] | None:
    """Match a raw request target the way the router does."""
    path, _, query = target.partition("?")
    return template.match(routing_path(path), query)


# --- parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "message"),
    [
        pytest.param("/jobs/{job", "unbalanced braces", id="open"),
        pytest.param("/jobs/job}", "unbalanced braces", id="close"),
        pytest.param("/jobs/{{job}}", "unbalanced braces", id="doubled"),
        pytest.param("/jobs/{a{b}}", "unbalanced braces", id="nested"),
        pytest.param("/jobs/{}", "must be an identifier", id="empty-name"),
        pytest.param("/jobs/{ job }", "must be an identifier", id="spaces"),
        pytest.param("/jobs/{1job}", "must be an identifier", id="digit-first"),
        pytest.param("/jobs/{job-id}", "must be an identifier", id="dash"),
        pytest.param("/jobs/{jöb}", "must be an identifier", id="non-ascii"),
        pytest.param("/jobs/{job}/{job}", "{job} is used twice", id="duplicate"),
        pytest.param("/t/{x}?x={x}", "{x} is used twice", id="duplicate-path-query"),
        pytest.param("/jobs/a{job}b", "whole path segment", id="partial"),
        pytest.param("/jobs/{job}.json", "whole path segment", id="suffix"),
        pytest.param("/jobs/{a}{b}", "whole path segment", id="two-in-one"),
        pytest.param("/events", "a static route, not a template", id="static"),
        pytest.param("/events?topic=news", "a static route, not a template", id="static-query"),
        pytest.param("jobs/{job}", 'starting with "/"', id="relative"),
        pytest.param("/jobs/{job}#x", "without #", id="fragment"),
        pytest.param("/jobs/{job}/", "write '/jobs/{job}'", id="trailing-slash"),
        pytest.param("/jobs//{job}", "write '/jobs/{job}'", id="double-slash"),
        pytest.param("/%6Aobs/{job}", "write '/jobs/{job}'", id="escaped-literal"),
        pytest.param("/jobs/{job}/..", "would not survive", id="dot-dot-eats-placeholder"),
        pytest.param("/a/%7Bx%7D/{y}", "would not survive", id="escaped-brace"),
        pytest.param("/jobs;v=1/{job}", "write '/jobs/{job}'", id="matrix"),
        pytest.param("/e/{x}?", "param={name} pairs", id="empty-query"),
        pytest.param("/e/{x}?topic", "param={name} pairs", id="no-value"),
        pytest.param("/events?topic=news&t={t}", "param={name} pairs", id="literal-value"),
        pytest.param("/events?t=x{t}", "param={name} pairs", id="partial-value"),
        pytest.param("/events?{t}={u}", "param={name} pairs", id="placeholder-name"),
        pytest.param("/events?a b={t}", "param={name} pairs", id="bad-param"),
        pytest.param("/events?t={a}&t={b}", "'t' is used twice", id="duplicate-param"),
    ],
)
def test_bad_route_templates_are_refused_with_a_reason(path: str, message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_route(path)
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("pattern", "patterns", "message"),
    [
        pytest.param("[a-z", {}, "not a regular expression", id="bad-regex"),
        pytest.param("x", {"room": "(("}, "not a regular expression", id="bad-override"),
        pytest.param("x", {"nope": "x"}, "name no placeholder", id="unknown-name"),
    ],
)
def test_bad_key_patterns_are_refused(pattern: str, patterns: dict[str, str], message: str) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_route("/t/{tenant}/rooms/{room}", pattern=pattern, patterns=patterns)
    assert message in str(caught.value)


def test_a_template_knows_its_names_segments_and_params() -> None:
    t = parse_route("/t/{tenant}/rooms/{room}?topic={topic}&since={since}")
    assert t.names == ("tenant", "room", "topic", "since")
    assert [s if isinstance(s, str) else s.name for s in t.segments] == [
        "t",
        "tenant",
        "rooms",
        "room",
    ]
    assert [(p, s.name) for p, s in t.params] == [("topic", "topic"), ("since", "since")]
    assert parse_route("/?topic={topic}").segments == ()


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/events", False), ("/jobs/{job}", True), ("/a}", True), ("/a{", True), ("/", False)],
)
def test_is_template(path: str, expected: bool) -> None:
    assert is_template(path) is expected


# --- matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "target", "keys"),
    [
        pytest.param("/jobs/{job}/progress", "/jobs/42/progress", {"job": "42"}, id="one"),
        pytest.param(
            "/jobs/{job}/progress",
            "/jobs/a-B_9/progress?lastEventId=3&_=17",
            {"job": "a-B_9"},
            id="other-params-ignored",
        ),
        pytest.param(
            "/t/{tenant}/rooms/{room}",
            "/t/acme/rooms/lobby",
            {"tenant": "acme", "room": "lobby"},
            id="two",
        ),
        pytest.param("/events?topic={topic}", "/events?topic=news", {"topic": "news"}, id="query"),
        pytest.param(
            "/events?topic={topic}", "/events?x=1&topic=news&y", {"topic": "news"}, id="among"
        ),
        pytest.param(
            "/events?topic={topic}", "/events?to%70ic=n%65ws", {"topic": "news"}, id="escaped"
        ),
        pytest.param(
            "/t/{tenant}/events?topic={topic}&room={room}",
            "/t/acme/events?room=r1&topic=t1",
            {"tenant": "acme", "topic": "t1", "room": "r1"},
            id="mixed-in-template-order",
        ),
        pytest.param("/?topic={topic}", "/?topic=x", {"topic": "x"}, id="root"),
        # The router's normalisation comes first, so these are the route a
        # static path would be, and the app only ever sees the clean key.
        pytest.param("/jobs/{job}/progress", "/jobs/%34%32/progress", {"job": "42"}, id="escape"),
        pytest.param("/jobs/{job}/progress", "//jobs//42//progress/", {"job": "42"}, id="slashes"),
        pytest.param("/jobs/{job}/progress", "/jobs/x/../42/progress", {"job": "42"}, id="dots"),
        pytest.param("/jobs/{job}/progress", "/jobs/42;x=1/progress", {"job": "42"}, id="matrix"),
        pytest.param("/jobs/{job}/progress", "/jobs/42%3Bx/progress", {"job": "42"}, id="enc-semi"),
    ],
)
def test_matching_keys(template: str, target: str, keys: dict[str, str]) -> None:
    matched = request(parse_route(template), target)
    assert matched is not None
    assert list(matched) == list(parse_route(template).names), "in template order"
    assert matched == keys


@pytest.mark.parametrize(
    "target",
    [
        "/jobs/42",
        "/jobs/42/progress/more",
        "/jobs/progress",
        "/Jobs/42/progress",
        "/jobs/42/Progress",
        "/",
        "/other",
    ],
)
def test_paths_of_another_shape_do_not_match(target: str) -> None:
    assert request(JOBS, target) is None


def test_match_wants_a_path_in_routing_form() -> None:
    assert JOBS.match("jobs/42/progress") is None
    assert JOBS.match("") is None


# Raw request segments for /jobs/<segment>/progress: each is refused (None)
# with the default pattern. Some turn into another path under the router's
# normalisation (`..`, `%2F`), the rest into a key the pattern refuses.
HOSTILE_SEGMENTS = [
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("%2e%2e", id="escaped-dot-dot"),
    pytest.param("%2E", id="escaped-dot"),
    pytest.param(".%2e", id="half-escaped-dot-dot"),
    pytest.param("..%2f..", id="dot-dot-slash"),
    pytest.param("a%2Fb", id="escaped-slash"),
    pytest.param("a%2fb", id="escaped-slash-lower"),
    pytest.param("a%5Cb", id="escaped-backslash"),
    pytest.param("", id="empty"),
    pytest.param("%00", id="nul"),
    pytest.param("abc%00", id="nul-after-key"),
    pytest.param("ab%00c", id="nul-inside-key"),
    pytest.param("a" * 65, id="65-chars"),
    pytest.param("a" * (1 << 20), id="1-mib"),
    pytest.param("%C0%AF", id="overlong-slash"),
    pytest.param("%ED%A0%80", id="surrogate"),
    pytest.param("%FF", id="not-utf8"),
    pytest.param("abc%80", id="stray-continuation"),
    pytest.param("%EF%BF%BD", id="replacement-char"),
    pytest.param("%252F", id="double-encoded-slash"),
    pytest.param("%252e%252e", id="double-encoded-dots"),
    pytest.param("%%32%65", id="cve-2021-42013"),
    pytest.param("%EF%BD%8A%EF%BD%8F%EF%BD%82", id="fullwidth-lookalike"),
    pytest.param("%EF%BC%91%EF%BC%92", id="fullwidth-digits"),
    pytest.param("%D9%A3", id="arabic-digit"),
    pytest.param("%C3%A9", id="e-acute"),
    pytest.param("job%C4%B1", id="dotless-i"),
    pytest.param("%0D%0A", id="crlf"),
    pytest.param("abc%0A", id="trailing-lf"),
    pytest.param("a%09b", id="tab"),
    pytest.param("a%20b", id="space"),
    pytest.param("a+b", id="plus"),
    pytest.param("a%3Fb", id="question-mark"),
    pytest.param("a%23b", id="hash"),
    pytest.param("a%26b%3Dc", id="amp-equals"),
    pytest.param("%40evil.example", id="at"),
    pytest.param("a:8080", id="colon"),
    pytest.param("a.", id="trailing-dot"),
    pytest.param("a~b", id="tilde"),
    pytest.param("%E2%80%AE", id="rtl-override"),
    pytest.param("a%E2%80%8Bb", id="zero-width-space"),
    pytest.param("a%zzb", id="bad-escape"),
    pytest.param("%", id="lone-percent"),
    pytest.param("a%2", id="truncated-escape"),
]


@pytest.mark.parametrize("segment", HOSTILE_SEGMENTS)
def test_hostile_path_keys_do_not_match(segment: str) -> None:
    assert request(JOBS, f"/jobs/{segment}/progress") is None


@pytest.mark.parametrize("segment", HOSTILE_SEGMENTS)
def test_hostile_path_keys_under_a_permissive_pattern_never_leave_the_template(
    segment: str,
) -> None:
    # Whatever a permissive pattern lets through renders into one upstream
    # segment and one query value: the app sees no path outside the template.
    for template in (PERMISSIVE, ANYTHING):
        keys = request(template, f"/jobs/{segment}/progress")
        if keys is not None:
            assert_same_structure(UPSTREAM.render_url(keys), keys["job"])


# Decoded keys, as a segment or query value would hold them. Every one is
# refused by the default pattern; `unsafe` marks the ones refused whatever
# the pattern (see the module docstring).
HOSTILE_KEYS = [
    pytest.param("..", True, id="dot-dot"),
    pytest.param(".", True, id="dot"),
    pytest.param("", True, id="empty"),
    pytest.param("a/b", True, id="slash"),
    pytest.param("../../admin", True, id="traversal"),
    pytest.param("a\\b", True, id="backslash"),
    pytest.param("a;b", True, id="semicolon"),
    pytest.param("\x00", True, id="nul"),
    pytest.param("ab\x00c", True, id="nul-inside"),
    pytest.param("a\r\nX-Evil: 1", True, id="crlf-header"),
    pytest.param("abc\n", True, id="trailing-lf"),
    pytest.param("\x7f", True, id="del"),
    pytest.param("\x85", True, id="c1-nel"),
    pytest.param("\ufffd", True, id="replacement"),
    pytest.param("a\u202eb", True, id="rtl-override"),
    pytest.param("a\u200bb", True, id="zero-width"),
    pytest.param("\ufeffa", True, id="bom"),
    pytest.param("a\u00adb", True, id="soft-hyphen"),
    pytest.param("a" * 65, False, id="65-chars"),
    pytest.param("%2F", False, id="literal-escape"),
    pytest.param("%2e%2e", False, id="literal-escaped-dots"),
    pytest.param("...", False, id="three-dots"),
    pytest.param("a.", False, id="trailing-dot"),
    pytest.param("\uff4a\uff4f\uff42", False, id="fullwidth"),
    pytest.param("\uff11\uff12", False, id="fullwidth-digits"),
    pytest.param("٣", False, id="arabic-digit"),
    pytest.param("é", False, id="e-acute"),
    pytest.param("a b", False, id="space"),
    pytest.param("a+b", False, id="plus"),
    pytest.param("a?b=c", False, id="query"),
    pytest.param("a#b", False, id="fragment"),
    pytest.param("a&v=2", False, id="param-injection"),
    pytest.param("@evil.example:81", False, id="authority"),
    pytest.param("http:", False, id="scheme"),
    pytest.param("~", False, id="tilde"),
    pytest.param("'\"<>", False, id="quotes"),
]


@pytest.mark.parametrize(("key", "unsafe"), HOSTILE_KEYS)
def test_the_default_pattern_refuses_hostile_keys(key: str, unsafe: bool) -> None:
    (slot,) = (s for s in JOBS.segments if not isinstance(s, str))
    assert not slot.accepts(key), "refused by the default pattern, unsafe or not"
    assert JOBS.match(f"/jobs/{key}/progress") is None


@pytest.mark.parametrize(("key", "unsafe"), HOSTILE_KEYS)
def test_some_keys_are_refused_whatever_the_pattern(key: str, unsafe: bool) -> None:
    (slot,) = (s for s in ANYTHING.segments if not isinstance(s, str))
    assert slot.accepts(key) is not unsafe


@pytest.mark.parametrize(("key", "unsafe"), HOSTILE_KEYS)
def test_rendering_a_hostile_key_keeps_the_upstream_structure(key: str, unsafe: bool) -> None:
    keys = {"job": key}
    if unsafe:
        with pytest.raises(UnsafeKey):
            UPSTREAM.render_url(keys)
        with pytest.raises(UnsafeKey):
            UPSTREAM.render_headers(keys)
        return
    assert_same_structure(UPSTREAM.render_url(keys), key)
    ((name, value),) = UPSTREAM.render_headers(keys)
    assert name == "X-Job"
    assert value.isascii() and value.isprintable() and unquote(value) == f"job {key}"


def assert_same_structure(url: str, key: str) -> None:
    template, rendered = urlsplit(UPSTREAM_URL), urlsplit(url)
    assert (rendered.scheme, rendered.hostname, rendered.port) == ("http", "127.0.0.1", 8000)
    assert (rendered.username, rendered.fragment) == (None, "")
    segments = rendered.path.split("/")
    assert len(segments) == len(template.path.split("/"))
    assert [segments[1], segments[3]] == ["jobs", "progress"]
    assert unquote(segments[2]) == key, "the app decodes exactly the key"
    assert segments[2] not in (".", "..")
    query = parse_qsl(rendered.query, keep_blank_values=True)
    assert [name for name, _ in query] == ["key", "v"]
    assert query == [("key", key), ("v", "1")]


@settings(max_examples=300)
@given(key=st.text())
def test_any_key_renders_into_one_segment_or_is_refused(key: str) -> None:
    try:
        url = UPSTREAM.render_url({"job": key})
    except UnsafeKey:
        (slot,) = (s for s in ANYTHING.segments if not isinstance(s, str))
        assert not slot.accepts(key)
        return
    assert_same_structure(url, key)


@pytest.mark.parametrize(
    "query",
    [
        pytest.param("", id="none"),
        pytest.param("other=1", id="other-param"),
        pytest.param("topic", id="no-value"),
        pytest.param("topic=", id="empty"),
        pytest.param("topic=a&topic=b", id="twice"),
        pytest.param("topic=a&to%70ic=a", id="twice-spelled-apart"),
        pytest.param("topic=%2e%2e", id="dot-dot"),
        pytest.param("topic=.", id="dot"),
        pytest.param("topic=a%2Fb", id="slash"),
        pytest.param("topic=a%26b%3Dc", id="amp-equals"),
        pytest.param("topic=a;b", id="semicolon"),
        pytest.param("topic=%00", id="nul"),
        pytest.param("topic=a%0D%0A", id="crlf"),
        pytest.param("topic=a+b", id="plus-is-space"),
        pytest.param("topic=a%20b", id="space"),
        pytest.param("topic=%FF", id="not-utf8"),
        pytest.param("topic=%C0%AF", id="overlong"),
        pytest.param("topic=%252F", id="double-encoded"),
        pytest.param("topic=%EF%BD%8A", id="fullwidth"),
        pytest.param("topic=" + "a" * 65, id="65-chars"),
        pytest.param("topic=a%zz", id="bad-escape"),
    ],
)
def test_hostile_query_keys_do_not_match(query: str) -> None:
    assert parse_route("/events?topic={topic}").match("/events", query) is None


def test_query_keys_are_decoded_strictly_once() -> None:
    anything = parse_route("/events?topic={topic}", pattern="(?s).+")
    assert anything.match("/events", "topic=%252F") == {"topic": "%2F"}
    assert anything.match("/events", "topic=a+b") == {"topic": "a b"}
    assert anything.match("/events", "topic=%C3%A9") == {"topic": "é"}
    assert anything.match("/events", "topic=%C3") is None  # truncated UTF-8
    assert anything.match("/events", "topic=a%2Fb") is None  # never a "/", even in a query


def test_path_keys_are_not_decoded_twice() -> None:
    assert request(PERMISSIVE, "/jobs/%252F/progress") == {"job": "%2F"}
    assert request(PERMISSIVE, "/jobs/%2F/progress") is None  # a new segment
    assert request(PERMISSIVE, "/jobs/%FF/progress") is None  # U+FFFD after routing_path


@pytest.mark.parametrize(
    ("pattern", "key", "accepted"),
    [
        pytest.param(r"\w+", "abc", True, id="w-ascii"),
        pytest.param(r"\w+", "é", False, id="w-not-unicode"),
        pytest.param(r"\d+", "١٢", False, id="d-not-arabic"),
        pytest.param(r"\d+", "\uff11\uff12", False, id="d-not-fullwidth"),
        pytest.param(r"[a-z]+$", "abc\n", False, id="dollar-before-lf"),
        pytest.param(r"[a-z]+", "abc1", False, id="anchored-end"),
        pytest.param(r"[a-z]+", "1abc", False, id="anchored-start"),
        pytest.param(r"[a-z]+|[0-9]+", "ab12", False, id="alternation-anchored"),
        pytest.param(r"[0-9]{1,3}", "1234", False, id="length"),
        pytest.param(r"[a-z.]+", "..", False, id="dots-never"),
        pytest.param(r"[a-z.]+", "a.b", True, id="dots-inside"),
        pytest.param(r".*", "", False, id="never-empty"),
    ],
)
def test_patterns_fully_match_ascii_classes(pattern: str, key: str, accepted: bool) -> None:
    template = parse_route("/jobs/{job}", pattern=pattern)
    assert (template.match(f"/jobs/{key}") is not None) is accepted


def test_patterns_per_name_override_the_template_pattern() -> None:
    t = parse_route("/t/{tenant}/rooms/{room}", pattern="[a-z]+", patterns={"room": "[0-9]+"})
    assert t.match("/t/acme/rooms/12") == {"tenant": "acme", "room": "12"}
    assert t.match("/t/acme/rooms/lobby") is None
    assert t.match("/t/12/rooms/12") is None
    assert DEFAULT_KEY_PATTERN == "[A-Za-z0-9_-]{1,64}"


# --- rendering -----------------------------------------------------------------------


def test_rendering_fills_in_url_and_header_values() -> None:
    upstream = parse_upstream(
        "http://app:8000/t/{tenant}/rooms/{room}/stream?since={since}",
        [("X-Tenant", "{tenant}"), ("Authorization", "Bearer static-{room}")],
    )
    keys = {"tenant": "acme", "room": "r-1", "since": "0"}
    assert upstream.render_url(keys) == "http://app:8000/t/acme/rooms/r-1/stream?since=0"
    assert upstream.render_headers(keys) == (
        ("X-Tenant", "acme"),
        ("Authorization", "Bearer static-r-1"),
    )
    assert upstream.names == ("tenant", "room", "since")


def test_rendering_a_missing_key_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        UPSTREAM.render_url({})


def test_an_upstream_without_placeholders_renders_as_is() -> None:
    upstream = parse_upstream("http://app/events", [("X-A", "b")])
    assert upstream.names == ()
    assert upstream.render_url({"job": "1"}) == "http://app/events"
    assert upstream.render_headers({}) == (("X-A", "b"),)


@pytest.mark.parametrize(
    ("url", "headers", "message"),
    [
        pytest.param("http://{host}/x", [], "never choose where it connects", id="host"),
        pytest.param("http://app:{port}/x", [], "never choose where it connects", id="port"),
        pytest.param("http://{u}@app/x", [], "never choose where it connects", id="userinfo"),
        pytest.param("{scheme}://app/x", [], "never choose where it connects", id="scheme"),
        pytest.param("http:/{x}", [], "never choose where it connects", id="no-authority"),
        pytest.param("http://app/x#{f}", [], "never choose where it connects", id="fragment"),
        pytest.param("http://app/{job", [], "unbalanced braces", id="unbalanced"),
        pytest.param("http://app/{}", [], "must be an identifier", id="empty"),
        pytest.param("http://app/x", [("X-{job}", "1")], "only values", id="header-name"),
        pytest.param("http://app/x", [("X-Job", "{job")], "unbalanced", id="header-value"),
    ],
)
def test_bad_upstream_templates_are_refused(
    url: str, headers: list[tuple[str, str]], message: str
) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_upstream(url, headers)
    assert message in str(caught.value)


def test_upstream_placeholders_may_be_part_of_a_segment_or_value() -> None:
    upstream = parse_upstream("http://app/jobs/job-{job}.sse?c=jobs.{job}&{job}=1")
    url = upstream.render_url({"job": "a&b=c"})
    assert url == "http://app/jobs/job-a%26b%3Dc.sse?c=jobs.a%26b%3Dc&a%26b%3Dc=1"
    assert [name for name, _ in parse_qsl(urlsplit(url).query)] == ["c", "a&b=c"]


# --- checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "url", "headers", "missing"),
    [
        pytest.param("/jobs/{job}", "http://app/jobs/{job}", [], (), id="all-there"),
        pytest.param("/jobs/{job}", "http://app/jobs", [], (), id="unused-is-fine"),
        pytest.param("/jobs/{job}", "http://app/jobs/{id}", [], ("id",), id="url"),
        pytest.param(
            "/t/{tenant}/r/{room}",
            "http://app/r/{room}?t={team}",
            [("X-T", "{tenant}"), ("X-O", "{org}-{team}")],
            ("team", "org"),
            id="url-and-headers-in-order",
        ),
        pytest.param("/events?topic={topic}", "http://app/e?t={topic}", [], (), id="query"),
    ],
)
def test_missing_placeholders(
    path: str, url: str, headers: list[tuple[str, str]], missing: tuple[str, ...]
) -> None:
    assert missing_placeholders(parse_route(path), parse_upstream(url, headers)) == missing


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        pytest.param("/jobs/{job}", "/jobs/{id}", True, id="same-shape"),
        pytest.param("/jobs/{job}/progress", "/jobs/{job}/log", False, id="literal-differs"),
        pytest.param("/jobs/{job}", "/jobs/{job}/log", False, id="length-differs"),
        pytest.param("/a/{x}/c", "/a/b/{y}", True, id="crossed"),
        pytest.param("/{x}/b", "/a/{y}", True, id="crossed-first"),
        pytest.param("/jobs/{job}", "/tasks/{job}", False, id="prefix-differs"),
        pytest.param("/a/{x}/new", "/a/{y}/{z}", True, id="literal-vs-placeholder"),
        pytest.param(
            "/jobs/{id}/x",
            "/jobs/new/{y}",
            False,
            id="literal-the-pattern-refuses",
        ),
        pytest.param("/events?topic={t}", "/events?topic={u}", True, id="same-param"),
        pytest.param("/events?topic={t}", "/events?room={r}", True, id="params-can-coexist"),
        pytest.param("/e/{x}", "/e/{y}?topic={t}", True, id="path-vs-query"),
        pytest.param("/a?topic={t}", "/b?topic={t}", False, id="paths-differ"),
    ],
)
def test_overlaps(a: str, b: str, expected: bool) -> None:
    numbers = {"id": "[0-9]+"}
    first = parse_route(a, patterns={k: v for k, v in numbers.items() if f"{{{k}}}" in a})
    second = parse_route(b, patterns={k: v for k, v in numbers.items() if f"{{{k}}}" in b})
    assert overlaps(first, second) is expected
    assert overlaps(second, first) is expected
    assert overlaps(first, first)


@pytest.mark.parametrize(
    ("template", "static", "expected"),
    [
        pytest.param("/jobs/{job}/progress", "/jobs/all/progress", True, id="shadowed-key"),
        pytest.param("/jobs/{job}/progress", "/jobs/all/progress/", True, id="routing-form"),
        pytest.param("/jobs/{job}/progress", "/jobs/%61ll/progress", True, id="escaped"),
        pytest.param("/jobs/{job}/progress", "/jobs/progress", False, id="shorter"),
        pytest.param("/jobs/{job}/progress", "/jobs/a.b/progress", False, id="pattern-refuses"),
        pytest.param("/jobs/{job}/progress", "/events", False, id="other"),
        pytest.param("/events?topic={topic}", "/events", True, id="query-template-shadowed"),
        pytest.param("/events?topic={topic}", "/other", False, id="query-template-other"),
    ],
)
def test_matches_static(template: str, static: str, expected: bool) -> None:
    assert matches_static(parse_route(template), static) is expected


# --- channel keys --------------------------------------------------------------------


def test_channel_keys_are_canonical_and_hashable() -> None:
    t = parse_route("/t/{tenant}/events?topic={topic}&room={room}")
    a = t.match("/t/acme/events", "topic=x&room=y")
    b = t.match("/t/acme/events", "room=y&topic=x&_=1")
    assert a is not None and b is not None
    assert (
        t.channel_key(a)
        == t.channel_key(b)
        == (
            ("tenant", "acme"),
            ("topic", "x"),
            ("room", "y"),
        )
    )
    assert len({t.channel_key(a), t.channel_key(b)}) == 1
    assert t.display(a) == "/t/acme/events?topic=x&room=y"


def test_display_is_safe_to_log() -> None:
    keys = request(PERMISSIVE, "/jobs/a%20b%C3%A9%3F/progress")
    assert keys == {"job": "a bé?"}
    shown = PERMISSIVE.display(keys)
    assert shown == "/jobs/a%20b%C3%A9%3F/progress"
    assert shown.isascii() and shown.isprintable()
    assert isinstance(UPSTREAM, UpstreamTemplate)


@pytest.mark.parametrize(
    ("template", "path", "claimed"),
    [
        ("/jobs/{job}/progress", "/jobs/42/progress", True),
        ("/jobs/{job}/progress", "/jobs/../progress", True),
        ("/jobs/{job}/progress", "/jobs/a/b/progress", True),
        ("/jobs/{job}/progress", "/jobs//progress", True),
        ("/jobs/{job}/progress", "/jobs/progress", False),
        ("/jobs/{job}/progress", "/jobs/42/log", False),
        ("/jobs/{job}/progress", "/other/42/progress", False),
        ("/t/{tenant}/rooms/{room}", "/t/a/rooms/b", True),
        ("/t/{tenant}/rooms/{room}", "/t/a/x/rooms/b", True),
        ("/t/{tenant}/rooms/{room}", "/u/a/rooms/b", False),
        ("/{x}", "/anything", True),
        ("/events?topic={topic}", "/events", True),
        ("/events?topic={topic}", "/events/x", False),
    ],
)
def test_claims_paths_of_the_template_whatever_the_key(
    template: str, path: str, claimed: bool
) -> None:
    assert parse_route(template).claims(path) is claimed


def test_claims_a_variant_form_with_folded_literals() -> None:
    template = parse_route("/Jobs/{job}/progress")
    assert template.claims("/jobs/x/progress", fold=True)
    assert not template.claims("/jobs/x/progress")
