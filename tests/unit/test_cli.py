"""`ssefan` command line, called as main(argv) with real files."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from ssefan.cli import main
from ssefan.config import Config, load_config

GOOD = """\
listen: 127.0.0.1:8080
app: http://127.0.0.1:8000
routes:
  - path: /events
    upstream: http://127.0.0.1:8000/events
  - path: /orders
    upstream: {url: "http://127.0.0.1:9000/orders/stream"}
"""

BAD = """\
listen: 127.0.0.1:8080
routes:
  - path: /events
    upstream: http://127.0.0.1:8000/events
    hearbeat: 5s
    buffer: 0
"""


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def bad(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    return path


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **functions: object) -> None:
    """Stand-in for ssefan.app / ssefan.demo: the CLI imports them lazily by name."""
    module = types.ModuleType(name)
    for attribute, value in functions.items():
        setattr(module, attribute, value)
    monkeypatch.setitem(sys.modules, name, module)


# --- check -------------------------------------------------------------------------


def test_check_ok_prints_a_summary(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--config", str(good)]) == 0
    out, err = capsys.readouterr()
    assert out == (
        "ok: 2 routes (/events -> http://127.0.0.1:8000/events,"
        " /orders -> http://127.0.0.1:9000/orders/stream),"
        " listen 127.0.0.1:8080, app http://127.0.0.1:8000\n"
    )
    assert err == ""


@pytest.mark.parametrize(
    ("text", "summary"),
    [
        pytest.param(
            'listen: "[::1]:9000"\nroutes:\n  - {path: /e, upstream: "http://[::1]:8000/e"}\n',
            "ok: 1 route (/e -> http://[::1]:8000/e), listen [::1]:9000\n",
            id="one-route-ipv6",
        ),
        pytest.param(
            "listen: 0.0.0.0:80\napp: http://app:8000\n",
            "ok: 0 routes, listen 0.0.0.0:80, app http://app:8000\n",
            id="pass-through-only",
        ),
    ],
)
def test_check_summary_forms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, summary: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == 0
    assert capsys.readouterr().out == summary


def test_check_errors_exit_2_with_every_problem(
    bad: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f'{bad}:5: routes[0].hearbeat: unknown key; did you mean "heartbeat"?',
        f"{bad}:6: routes[0].buffer: expected an integer >= 1, got 0",
        f"found 2 problems; fix them and run 'ssefan check --config {bad}' again",
    ]


def test_check_accepts_the_operational_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text(
        GOOD
        + "    auth: {url: 'http://127.0.0.1:8000/auth', token_param: token}\n"
        + "proxy: {max_body_bytes: 1MiB}\n"
        + "trusted_proxies: [10.0.0.0/8]\n"
        + "admin: {listen: 127.0.0.1:9090}\n"
        + "workers: auto\n"
        + "drain_window: 5s\nshutdown_timeout: 20s\nready_timeout: 5s\n"
    )
    assert main(["check", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 2 routes ")


def test_check_reports_problems_in_the_operational_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ops.yaml"
    path.write_text(GOOD + "admin: {listen: 127.0.0.1:8080}\nshutdown_timeout: 10s\n")
    assert main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}:9: shutdown_timeout: expected more than drain_window (10s), got 10s:"
        " the streams must be drained before the deadline",
        f"{path}:8: admin.listen: 127.0.0.1:8080 is the same address as listen;"
        " give the admin endpoints a port of their own",
        f"found 2 problems; fix them and run 'ssefan check --config {path}' again",
    ]


def test_check_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "missing config.yaml"
    assert main(["check", "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: cannot read the file: No such file or directory",
        f"found 1 problem; fix it and run 'ssefan check --config '{path}'' again",
    ]


def test_check_yaml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listen: 127.0.0.1:8080\nroutes: [\n")
    assert main(["check", "--config", str(path)]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith(f"{path}: line 3, column 1: invalid YAML: ")


def test_check_needs_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check"]) == 2
    assert "the following arguments are required: --config" in capsys.readouterr().err


# --- serve ---------------------------------------------------------------------------


def test_serve_passes_the_loaded_config_to_app(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Config] = []

    def serve(config: Config) -> int:
        served.append(config)
        return 7

    fake_module(monkeypatch, "ssefan.ops.app", serve=serve)
    assert main(["serve", "--config", str(good)]) == 7
    assert served == [load_config(good)]


def test_serve_with_bad_config_exits_2_without_starting(
    bad: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def serve(config: Config) -> int:
        raise AssertionError("serve must not start with a bad config")

    fake_module(monkeypatch, "ssefan.ops.app", serve=serve)
    assert main(["serve", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"found 2 problems; fix them and run 'ssefan check --config {bad}' again"
    )


@pytest.mark.parametrize(
    ("argv", "level"),
    [
        pytest.param([], "INFO", id="default-info"),
        pytest.param(["--log-level", "debug"], "DEBUG", id="debug"),
        pytest.param(["--log-level", "WARNING"], "WARNING", id="case-insensitive"),
    ],
)
def test_serve_log_level(
    good: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], level: str
) -> None:
    configured: list[dict[str, object]] = []
    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: configured.append(kwargs))
    fake_module(monkeypatch, "ssefan.ops.app", serve=lambda config: 0)
    assert main(["serve", "--config", str(good), *argv]) == 0
    [kwargs] = configured
    assert kwargs["level"] == level
    assert kwargs["stream"] is sys.stderr


def test_serve_refuses_unknown_log_level(good: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(good), "--log-level", "loud"]) == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


# --- demo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        pytest.param([], ("127.0.0.1", 8080), id="defaults"),
        pytest.param(["--host", "0.0.0.0", "--port", "9000"], ("0.0.0.0", 9000), id="given"),
    ],
)
def test_demo_runs_with_host_and_port(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], expected: tuple[str, int]
) -> None:
    calls: list[tuple[str, int]] = []

    def run_demo(host: str, port: int) -> int:
        calls.append((host, port))
        return 0

    monkeypatch.setattr(logging, "basicConfig", lambda **kwargs: None)
    fake_module(monkeypatch, "ssefan.demo", run_demo=run_demo)
    assert main(["demo", *argv]) == 0
    assert calls == [expected]


@pytest.mark.parametrize("port", ["65536", "-1", "http"])
def test_demo_refuses_bad_port(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", port]) == 2
    assert f"expected a port from 0 to 65535, got '{port}'" in capsys.readouterr().err


# --- the program -------------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"ssefan {importlib.metadata.version('ssefan')}\n"


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: ssefan" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli(good: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ssefan", "check", "--config", str(good)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("ok: 2 routes (/events -> ")


def test_check_summary_redacts_credentials_as_logs_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "secret.yaml"
    path.write_text(
        "listen: 127.0.0.1:8080\n"
        "app: http://127.0.0.1:8000\n"
        "routes:\n"
        "  - path: /events\n"
        "    upstream:\n"
        "      url: http://127.0.0.1:8000/events?access_token=tok-in-query\n"
        "  - path: /orders\n"
        "    upstream:\n"
        "      url: http://127.0.0.1:9000/orders/header-secret-value\n"
        "      headers: {Authorization: Bearer header-secret-value}\n"
    )
    assert main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    for secret in ("tok-in-query", "header-secret-value"):
        assert secret not in out, out
    assert "/events -> http://127.0.0.1:8000/events?access_token=*** " not in out
    assert "/events -> http://127.0.0.1:8000/events?access_token=***," in out
    assert out.startswith("ok: 2 routes")


def test_check_never_prints_credential_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln"
    path = tmp_path / "params.yaml"
    path.write_text(
        "listen: 127.0.0.1:8080\n"
        "routes:\n"
        "  - path: /events\n"
        f"    upstream: 'http://127.0.0.1:8000/events?jwt={jwt}&code=oauth-code-77&topic=news'\n"
        "  - path: /files\n"
        "    upstream: 'http://127.0.0.1:8000/f?X-Amz-Signature=amz-sig-88&X-Amz-Expires=60'\n"
    )
    assert main(["check", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    for secret in (jwt, "oauth-code-77", "amz-sig-88"):
        assert secret not in out + err, out
    assert "/events -> http://127.0.0.1:8000/events?jwt=***&code=***&topic=news," in out
    assert "/files -> http://127.0.0.1:8000/f?X-Amz-Signature=***&X-Amz-Expires=60)," in out


def test_check_problems_never_print_credential_params(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad-url.yaml"
    path.write_text(
        "listen: 127.0.0.1:8080\n"
        "routes:\n"
        "  - path: /events\n"
        "    upstream: 'ftp://127.0.0.1:8000/events?jwt=jwt-secret-1&code=code-secret-2'\n"
        "  - path: /cb\n"
        "    upstream: 'http://127.0.0.1:8000/cb#access_token=fragment-secret-3'\n"
    )
    assert main(["check", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "ftp://127.0.0.1:8000/events?jwt=***&code=***" in err
    assert "http://127.0.0.1:8000/cb#access_token=***" in err
    for secret in ("jwt-secret-1", "code-secret-2", "fragment-secret-3"):
        assert secret not in out + err, err


# --- an address already in use ---------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port this test process listens on (without SO_REUSEPORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        pytest.param("serve", "or set another `listen:` in ", id="serve"),
        pytest.param("serve-workers", "or set another `listen:` in ", id="serve-supervisor"),
        pytest.param("demo", "pick another port with --port N", id="demo"),
    ],
)
def test_address_in_use_is_one_line_and_exit_2(
    tmp_path: Path, taken_port: int, command: str, hint: str
) -> None:
    workers = "workers: 2\n" if command == "serve-workers" else ""
    path = tmp_path / "taken.yaml"
    path.write_text(
        f"listen: 127.0.0.1:{taken_port}\n{workers}"
        "routes:\n  - path: /e\n    upstream: http://127.0.0.1:8000/e\n"
    )
    if command == "demo":
        argv = ["demo", "--port", str(taken_port)]
    else:
        argv = ["serve", "--config", str(path)]
    result = subprocess.run(
        [sys.executable, "-m", "ssefan", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"ssefan: cannot listen on 127.0.0.1:{taken_port}: ")
    assert "the address is in use" in line
    # The holder is this test process: /proc names it.
    assert f"held by pid {os.getpid()} (" in line
    assert hint in line


@pytest.mark.parametrize("workers", ["", "workers: 2\n"], ids=["serve", "serve-supervisor"])
def test_admin_address_in_use_names_admin_listen_and_exits_2(
    tmp_path: Path, taken_port: int, workers: str
) -> None:
    path = tmp_path / "admin-taken.yaml"
    path.write_text(
        f"listen: 127.0.0.1:0\nadmin: {{listen: 127.0.0.1:{taken_port}}}\n{workers}"
        "routes:\n  - path: /e\n    upstream: http://127.0.0.1:8000/e\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "ssefan", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"ssefan: cannot listen on 127.0.0.1:{taken_port}: "), last
    assert "the address is in use" in last and "set another `admin.listen:` in " in last
