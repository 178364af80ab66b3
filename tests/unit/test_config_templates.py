"""Template routes in the config: what `ssefan check` accepts and what it says."""

from __future__ import annotations

import textwrap

import pytest

from ssefan.config import ConfigError, parse_config
from ssefan.core.template import DEFAULT_KEY_PATTERN


def config(routes: str, top: str = "") -> str:
    return (
        "listen: 127.0.0.1:8080\n"
        + top
        + "routes:\n"
        + textwrap.indent(textwrap.dedent(routes), "  ")
    )


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "config.yaml")
    return caught.value.problems


def test_a_template_route_is_lazy_with_default_key_and_limits() -> None:
    loaded = parse_config(
        config(
            """\
            - path: /jobs/{job}/progress
              upstream: http://127.0.0.1:8000/jobs/{job}/progress
              max_channels: 50
              key: {pattern: "[0-9]{1,12}"}
            - path: /t/{tenant}/rooms/{room}
              upstream:
                url: http://127.0.0.1:8000/rooms/{room}?tenant={tenant}
                headers: {X-Tenant: "{tenant}"}
            - path: /events?topic={topic}
              upstream: http://127.0.0.1:8000/topics/{topic}
            """,
            top="max_channels: 500\nring_bytes_total: 64MiB\n",
        ),
        "config.yaml",
    )
    jobs, rooms, topics = loaded.routes
    assert (jobs.mode, jobs.max_channels, jobs.key.pattern) == ("lazy", 50, "[0-9]{1,12}")
    assert (rooms.mode, rooms.max_channels, rooms.key.pattern) == (
        "lazy",
        None,
        DEFAULT_KEY_PATTERN,
    )
    assert rooms.upstream.headers == (("X-Tenant", "{tenant}"),)
    assert topics.path == "/events?topic={topic}"
    assert (loaded.max_channels, loaded.ring_bytes_total) == (500, 64 * 1024 * 1024)


def test_global_defaults() -> None:
    loaded = parse_config(config("- {path: /e, upstream: 'http://127.0.0.1:8000/e'}\n"), "c")
    assert (loaded.max_channels, loaded.ring_bytes_total) == (10_000, 256 * 1024 * 1024)
    assert loaded.routes[0].mode == "eager"  # a static route keeps its default


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param(
            """\
            - path: /jobs/{id}/progress
              upstream: http://127.0.0.1:8000/x/{idd}
            """,
            [
                'config.yaml:4: routes[0].upstream: uses {idd}, which path "/jobs/{id}/progress"'
                " does not have; every placeholder in the upstream must come from the path"
            ],
            id="placeholder-missing-from-path",
        ),
        pytest.param(
            """\
            - path: /t/{tenant}
              upstream: {url: 'http://127.0.0.1:8000/t', headers: {X-Room: "{room}"}}
            """,
            [
                'config.yaml:4: routes[0].upstream.url: uses {room}, which path "/t/{tenant}"'
                " does not have; every placeholder in the upstream must come from the path"
            ],
            id="header-placeholder-missing-from-path",
        ),
        pytest.param(
            """\
            - path: /events
              upstream: http://127.0.0.1:8000/e/{x}
              max_channels: 3
            """,
            [
                'config.yaml:4: routes[0].upstream: uses {x}, but path "/events" has no'
                ' placeholder; write the path as a template, like "/jobs/{x}/progress"',
                "config.yaml:5: routes[0].max_channels: applies only to a template route (a path"
                ' with {name} placeholders, like "/jobs/{job}/progress"); "/events" is a fixed'
                " path",
            ],
            id="static-route-with-template-settings",
        ),
        pytest.param(
            """\
            - path: /rooms/{room}
              upstream: http://127.0.0.1:8000/r/{room}
              mode: eager
            """,
            [
                "config.yaml:5: routes[0].mode: a template route is always lazy (a key's channel"
                " opens with its first client and closes linger after its last); remove mode"
            ],
            id="eager-template",
        ),
        pytest.param(
            """\
            - path: /rooms/{room}
              upstream: http://127.0.0.1:8000/r/{room}
              key: {pattern: "[0-9"}
            """,
            [
                "config.yaml:5: routes[0].key.pattern: key pattern '[0-9' is not a regular"
                " expression: unterminated character set at position 0"
            ],
            id="bad-key-pattern",
        ),
        pytest.param(
            """\
            - path: /a{x}b
              upstream: http://127.0.0.1:8000/t
            """,
            [
                "config.yaml:3: routes[0].path: a placeholder must be a whole path segment, like"
                " /a/{x}/b, but 'a{x}b' in '/a{x}b' has more around it"
            ],
            id="placeholder-inside-a-segment",
        ),
        pytest.param(
            """\
            - path: /jobs/{job}/progress
              upstream: http://127.0.0.1:8000/a/{job}
            - path: /jobs/{id}/progress
              upstream: http://127.0.0.1:8000/b/{id}
            """,
            [
                'config.yaml:5: routes[1].path: "/jobs/{id}/progress" can match the same requests'
                ' as routes[0].path "/jobs/{job}/progress"; make a literal segment differ, or'
                " narrow one key pattern so that no key fits both"
            ],
            id="overlapping-templates",
        ),
        pytest.param(
            """\
            - path: /t?topic={topic}
              upstream: http://127.0.0.1:8000/t?topic={topic}
            - path: /t
              upstream: http://127.0.0.1:8000/t
            """,
            [
                'config.yaml:3: routes[0].path: "/t?topic={topic}" is never reached:'
                ' routes[1].path "/t" takes every request for that path (a static route wins);'
                " give the template a path of its own"
            ],
            id="query-template-shadowed-by-static",
        ),
    ],
)
def test_bad_template_config(routes: str, expected: list[str]) -> None:
    assert problems(config(routes)) == expected


def test_templates_apart_and_a_static_inside_one_are_fine() -> None:
    loaded = parse_config(
        config(
            """\
            - path: /jobs/{job}/progress
              upstream: http://127.0.0.1:8000/a/{job}
            - path: /jobs/all/progress
              upstream: http://127.0.0.1:8000/all
            - path: /jobs/{job}/log
              upstream: http://127.0.0.1:8000/log/{job}
            - path: /n/{n}
              upstream: http://127.0.0.1:8000/n/{n}
              key: {pattern: "[0-9]+"}
            - path: /n/latest
              upstream: http://127.0.0.1:8000/latest
            """
        ),
        "config.yaml",
    )
    assert [route.path for route in loaded.routes][:2] == [
        "/jobs/{job}/progress",
        "/jobs/all/progress",
    ]
