"""ssefan as the tests run it: a real subprocess on a written config, started, signalled, stopped.

* `write_config`, `route_config`, `multi_route_config`, `fast_upstream`: the
  YAML config, always on 127.0.0.1:0 in front of a `FakeUpstream`.
* `SsefanProcess`: `python -m ssefan serve --config FILE`; the listening URL
  (the config says port 0) is read from its log line. `CommandProcess` runs
  another command line the same way, `VerboseSsefan` logs at debug level.
* `running` / `running_config`: either as a context manager, stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Self

import yaml
from sse_upstream import FakeUpstream
from waits import DEFAULT_TIMEOUT, wait_until


def write_config(path: Path, config: dict[str, object]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def route_config(upstream: FakeUpstream, **route: object) -> dict[str, object]:
    """A one-route config on 127.0.0.1:0 in front of `upstream`; `route` overrides."""
    base: dict[str, object] = {"path": "/events", "upstream": upstream.url, "heartbeat": "15s"}
    base.update(route)
    return {"listen": "127.0.0.1:0", "routes": [base]}


def multi_route_config(
    upstream: FakeUpstream, routes: list[dict[str, object]], **top: object
) -> dict[str, object]:
    """A config on 127.0.0.1:0 with `routes` (each gets upstream + heartbeat defaults)."""
    full = [{"upstream": upstream.url, "heartbeat": "15s", **route} for route in routes]
    return {"listen": "127.0.0.1:0", **top, "routes": full}


def fast_upstream(upstream: FakeUpstream, **keys: object) -> dict[str, object]:
    """The mapping form of a route's upstream, with quick reconnects for tests."""
    return {"url": upstream.url, "backoff_base": "50ms", "backoff_max": "200ms", **keys}


def serve_args(config_path: Path, *extra: str) -> list[str]:
    """The command line of `ssefan serve` on `config_path`, with `extra` options."""
    return [sys.executable, "-m", "ssefan", "serve", "--config", str(config_path), *extra]


class SsefanProcess:
    """`python -m ssefan serve` on a config whose listen port is 0.

    `pass_fds` are inherited by the process (a listening socket handed over);
    with `stderr_to` its log goes to that file descriptor instead of `lines`,
    and `start()` returns without waiting for the listening line.
    """

    LISTENING = re.compile(r"listening on (https?://\S+)")

    def __init__(
        self,
        config_path: Path,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        pass_fds: tuple[int, ...] = (),
        stderr_to: int | None = None,
    ) -> None:
        self.config_path = config_path
        self.args = list(args)  # extra `ssefan serve` options, e.g. --log-level
        self.pass_fds = pass_fds
        self.stderr_to = stderr_to
        self.lines: list[str] = []
        self.url = ""
        self._env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def command(self) -> list[str]:
        return serve_args(self.config_path, *self.args)

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> Self:
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if self.stderr_to is None else self.stderr_to,
            text=True,
            env=self._env,
            pass_fds=self.pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if self.stderr_to is not None:
            return self  # the log goes elsewhere: the caller waits on it there
        wait_until(
            lambda: bool(self.url) or self.proc is None or self.proc.poll() is not None,
            timeout,
            "ssefan to listen",
        )
        if not self.url:
            raise AssertionError("ssefan did not start:\n" + self.log_text())
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if not self.url and (m := self.LISTENING.search(line)):
                self.url = m.group(1)

    @property
    def host(self) -> str:
        return self.url.split("//", 1)[1].rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(DEFAULT_TIMEOUT)
        if self._reader is not None:
            self._reader.join(DEFAULT_TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class CommandProcess(SsefanProcess):
    """SsefanProcess for another command line: `argv` runs instead of
    `python -m ssefan serve --config FILE` (which `serve_args()` gives)."""

    def __init__(
        self,
        config_path: Path,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        stderr_to: int | None = None,
    ) -> None:
        super().__init__(config_path, env=env, pass_fds=pass_fds, stderr_to=stderr_to)
        self.argv = argv

    def command(self) -> list[str]:
        return self.argv


class VerboseSsefan(SsefanProcess):
    """ssefan at --log-level debug: every log line a test can check for secrets."""

    def __init__(self, config_path: Path) -> None:
        super().__init__(config_path, args=("--log-level", "debug"))


@contextlib.contextmanager
def running(upstream: FakeUpstream, tmp_path: Path, **route: object) -> Iterator[SsefanProcess]:
    """ssefan in front of `upstream` with one route; stopped on exit."""
    path = write_config(tmp_path / "ssefan.yaml", route_config(upstream, **route))
    proc = SsefanProcess(path).start()
    try:
        yield proc
    finally:
        proc.stop()


@contextlib.contextmanager
def running_config(
    tmp_path: Path, config: dict[str, object], name: str = "ssefan.yaml"
) -> Iterator[SsefanProcess]:
    """ssefan on an arbitrary config dict; stopped on exit."""
    proc = SsefanProcess(write_config(tmp_path / name, config)).start()
    try:
        yield proc
    finally:
        proc.stop()


def signal_proc(proc: SsefanProcess, sig: signal.Signals) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, sig)


def wait_log(proc: SsefanProcess, text: str, count: int = 1) -> None:
    wait_until(lambda: proc.log_text().count(text) >= count, DEFAULT_TIMEOUT, repr(text))


def stop_clean(proc: SsefanProcess) -> None:
    """Stop ssefan and check it logged no error and no traceback meanwhile."""
    proc.stop()
    bad = [line for line in proc.lines if "level=error" in line.lower() or "Traceback" in line]
    assert not bad, "ssefan logged errors:\n" + "\n".join(bad)


# What systemd does between fork and exec for a socket-activated service: the
# socket at fd 3, LISTEN_FDS=1 and LISTEN_PID naming the process that will run
# ssefan (known only in it).
ACTIVATE = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ssefan', *sys.argv[2:]])\n"
)


def activated(config_path: Path, listener: socket.socket) -> CommandProcess:
    """`ssefan serve` started the way systemd starts a socket-activated service."""
    fd = listener.fileno()
    argv = [sys.executable, "-c", ACTIVATE, str(fd), "serve", "--config", str(config_path)]
    return CommandProcess(config_path, argv, pass_fds=(fd,)).start()
