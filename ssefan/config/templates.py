"""A template route's settings (`/jobs/{job}/progress`): its key and the checks
that its path, upstream and limits fit together. The grammar is core.template's.
"""

from __future__ import annotations

from ssefan.config.keys import _KEY_KEYS
from ssefan.config.reader import _Reader, _Section
from ssefan.config.schema import _KEY_DEFAULTS, KeyConfig, RouteConfig
from ssefan.config.values import _BadValue, _show
from ssefan.core.template import (
    TemplateError,
    is_template,
    missing_placeholders,
    parse_route,
    parse_upstream,
)

__all__ = ["check_template", "read_key"]


def check_template(reader: _Reader, section: _Section, route: RouteConfig) -> bool:
    """A template route's settings fit together; a static route has none of them."""
    upstream = route.upstream
    try:
        upstream_template = parse_upstream(upstream.url, upstream.headers)
    except TemplateError as err:
        reader.report(_upstream_url_path(section), str(err))
        return False
    if not is_template(route.path):
        uses = upstream_template.names
        if uses:
            reader.report(
                _upstream_url_path(section),
                f"uses {_placeholders(uses)}, but path {_show(route.path)} has no placeholder;"
                f' write the path as a template, like "/jobs/{{{uses[0]}}}/progress"',
            )
        for key in ("key", "max_channels"):
            if key in section.values:
                reader.report(
                    section.path_of(key),
                    f"applies only to a template route (a path with {{name}} placeholders,"
                    f' like "/jobs/{{job}}/progress"); {_show(route.path)} is a fixed path',
                )
        return not uses
    if "mode" in section.values and route.mode == "eager":
        reader.report(
            section.path_of("mode"),
            "a template route is always lazy (a key's channel opens with its first client and"
            " closes linger after its last); remove mode",
        )
        return False
    try:
        template = parse_route(route.path, pattern=route.key.pattern)
    except TemplateError as err:
        reader.report(section.path_of("path"), str(err))
        return False
    missing = missing_placeholders(template, upstream_template)
    if missing:
        reader.report(
            _upstream_url_path(section),
            f"uses {_placeholders(missing)}, which path {_show(route.path)} does not have;"
            " every placeholder in the upstream must come from the path",
        )
        return False
    return True


def _upstream_url_path(section: _Section) -> str:
    raw = section.values.get("upstream")
    path = section.path_of("upstream")
    return f"{path}.url" if isinstance(raw, dict) else path


def _placeholders(names: tuple[str, ...]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def read_key(reader: _Reader, raw: object, path: str) -> KeyConfig | None:
    section = reader.section(
        raw, path, _KEY_KEYS, 'a mapping with pattern, like {pattern: "[0-9]{1,12}"}'
    )
    if section is None:
        return None
    pattern = section.get("pattern", _key_pattern, _KEY_DEFAULTS.pattern)
    return KeyConfig(pattern=pattern)


def _key_pattern(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _BadValue(
            f'expected a regular expression for the whole key, like "[0-9]{{1,12}}", got'
            f" {_show(value)}"
        )
    try:
        parse_route("/{key}", pattern=value)
    except TemplateError as err:
        raise _BadValue(str(err)) from None
    return value
