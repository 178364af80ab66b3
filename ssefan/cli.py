"""Command line: `ssefan serve | check | demo`.

`main(argv) -> int` returns the exit status instead of exiting, so tests call it
directly. Exit statuses: 0 ok, 2 bad usage, an invalid config file or a
listen address that can't be bound (the convention argparse already uses for
usage errors: the command line or the config must change).

Everything printed passes through `redact` (ssefan.http.redaction), as log lines do: a URL in a
config ends up in CI logs and terminals' scrollback.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import sys

from ssefan.config import Config, ConfigError, load_config
from ssefan.ops import logs
from ssefan.ops.logs import LOG_FORMATS
from ssefan.ops.sockets import ListenError
from ssefan.ops.worker import inherited_config, log_fields

EXIT_OK = 0
EXIT_CONFIG = 2

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        # argparse exits on --help, --version and usage errors; return instead.
        return _exit_status(exit_.code)
    command: str = args.command
    if command == "check":
        return _check(args.config)
    if command == "serve":
        return _serve(args.config, args.log_level, args.log_format)
    return _demo(args.host, args.port, args.log_level, args.log_format)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssefan",
        description="Server-Sent Events fan-out sidecar: one upstream subscription per route,"
        " any number of clients, exact replay with Last-Event-ID.",
    )
    parser.add_argument("--version", action="version", version=f"ssefan {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate a config file and summarise it")
    _add_config_option(check)

    serve = commands.add_parser("serve", help="run the sidecar with a config file")
    _add_config_option(serve)
    _add_log_level_option(serve)

    demo = commands.add_parser("demo", help="run a self-contained demo (ticker app + page)")
    demo.add_argument("--host", default="127.0.0.1", help="address to serve on (%(default)s)")
    demo.add_argument("--port", type=_port, default=8080, help="port to serve on (%(default)s)")
    _add_log_level_option(demo)
    return parser


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the YAML config file")


def _add_log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="info",
        help="log messages at this level and above to stderr (%(default)s)",
    )
    parser.add_argument(
        "--log-format",
        type=str.lower,
        choices=LOG_FORMATS,
        default="text",
        help="one line per record: key=value text or JSON (%(default)s)",
    )


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def _exit_status(code: str | int | None) -> int:
    if code is None:
        return EXIT_OK
    return code if isinstance(code, int) else EXIT_CONFIG


def _version() -> str:
    try:
        return importlib.metadata.version("ssefan")
    except importlib.metadata.PackageNotFoundError:  # running from a source tree
        from ssefan import __version__

        return __version__


def _check(path: str) -> int:
    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    print(f"ok: {summary(config)}")
    return EXIT_OK


def _serve(path: str, log_level: str, log_format: str = "text") -> int:
    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    _configure_logging(log_level, log_format)
    logs.remember_secrets(config)
    # Imported here so `check` and `--version` never load the server stack.
    from ssefan.ops.app import serve
    from ssefan.stream.state import StateDirError

    try:
        return serve(config)
    except ListenError as err:
        where = f"set another `{err.setting}:` in {shlex.quote(path)}"
        return _cannot_listen(err, f"stop what holds it, or {where}" if err.in_use else where)
    except StateDirError as err:
        # One line, no traceback: the directory is the user's to fix.
        print(f"ssefan: {err} (set in {shlex.quote(path)})", file=sys.stderr)
        return EXIT_CONFIG


def _demo(host: str, port: int, log_level: str, log_format: str = "text") -> int:
    _configure_logging(log_level, log_format)
    from ssefan.demo import run_demo

    try:
        return run_demo(host=host, port=port)
    except ListenError as err:
        if err.in_use:
            hint = "stop what holds it, or pick another port with --port N (--port 0: any free one)"
        else:
            hint = "pick another address with --host, or a port with --port"
        return _cannot_listen(err, hint)


def _cannot_listen(err: ListenError, hint: str) -> int:
    # One line, no traceback: the address is the user's to change, not a bug.
    print(logs.redact(f"ssefan: {err}; {hint}"), file=sys.stderr)
    return EXIT_CONFIG


def _load_or_report(path: str) -> Config | None:
    """The config, or None after printing every problem and how to go on.

    A supervisor's worker takes the config its supervisor validated (see
    ssefan/worker.py), not whatever the file says by now."""
    try:
        return inherited_config(path) or load_config(path)
    except ConfigError as err:
        for problem in err.problems:
            print(logs.redact(problem), file=sys.stderr)
        count = len(err.problems)
        found = f"found {count} problem{'s' if count != 1 else ''}"
        them = "them" if count != 1 else "it"
        print(
            logs.redact(
                f"{found}; fix {them} and run 'ssefan check --config {shlex.quote(path)}' again"
            ),
            file=sys.stderr,
        )
        return None


def summary(config: Config) -> str:
    """One line: routes with their upstreams, the listen address and the app.

    Redacted as log lines are (`redact` (ssefan.http.redaction), and the config's own secrets):
    the output of `ssefan check` ends up in CI logs and terminals' scrollback."""
    redact = logs.Redactor()
    redact.add(logs.config_secrets(config))
    count = len(config.routes)
    routes = f"{count} route{'s' if count != 1 else ''}"
    if config.routes:
        pairs = ", ".join(f"{route.path} -> {route.upstream.url}" for route in config.routes)
        routes += f" ({pairs})"
    host = config.listen.host
    listen = f"[{host}]" if ":" in host else host
    line = f"{routes}, listen {listen}:{config.listen.port}"
    tls = config.listen.tls
    if tls is not None:
        line += f" (TLS {tls.min_version}+, cert {tls.cert}, alpn {', '.join(tls.alpn)})"
    line += f", app {config.app}" if config.app else ""
    line += f", state_dir {config.state_dir}" if config.state_dir else ""
    return redact(line)


def _configure_logging(level: str, log_format: str = "text") -> None:
    logs.configure(level, log_format, fields=log_fields())
