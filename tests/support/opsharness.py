"""Helpers for the operations tests (test_ops_*): an sd_notify receiver, the
admin endpoints, Prometheus scraping, and signals to a running ssefan."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import DEFAULT_TIMEOUT, SsefanProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families

ADMIN_LINE = re.compile(r"admin endpoints at (http://\S+)")


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
        super().__init__(config_path, env=env)
        self.argv = argv
        self.pass_fds = pass_fds
        self.stderr_to = stderr_to

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> CommandProcess:
        self.proc = subprocess.Popen(
            self.argv,
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


def serve_args(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ssefan", "serve", "--config", str(config_path), *extra]


@dataclass
class NotifyReceiver:
    """A datagram socket to hand ssefan as NOTIFY_SOCKET, as systemd would."""

    address: str  # what NOTIFY_SOCKET says: a path or "@abstract"
    sock: socket.socket
    messages: list[dict[str, str]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)

    @classmethod
    def bind(cls, address: str) -> NotifyReceiver:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        sock.settimeout(0.05)
        return cls(address, sock)

    def poll(self) -> None:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append(fields)
            self.received_at.append(time.monotonic())

    def wait_for(
        self, predicate: Callable[[dict[str, str]], bool], what: str, after: int = 0
    ) -> int:
        """Index of the first message from `after` on that satisfies `predicate`."""
        found: list[int] = []

        def check() -> bool:
            self.poll()
            found[:] = [i for i, m in enumerate(self.messages) if i >= after and predicate(m)]
            return bool(found)

        wait_until(check, DEFAULT_TIMEOUT, what)
        return found[0]

    def close(self) -> None:
        self.sock.close()


def admin_url(proc: SsefanProcess) -> str:
    found: list[str] = []

    def check() -> bool:
        found[:] = [m.group(1) for line in proc.lines if (m := ADMIN_LINE.search(line))]
        return bool(found)

    wait_until(check, DEFAULT_TIMEOUT, "the admin endpoints line")
    return found[0]


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET; errors are answers too."""
    try:
        with urllib.request.urlopen(url, timeout=DEFAULT_TIMEOUT) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["content-type"], err.read()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    status, content_type, body = get(url + "/metrics")
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, (
        f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    )
    return samples[key]


def maybe(samples: Samples, name: str, **labels: str) -> float | None:
    """A sample's value, or None while it is absent (for waiting on it)."""
    return samples.get((name, frozenset(labels.items())))


def signal_proc(proc: SsefanProcess, sig: signal.Signals) -> None:
    assert proc.proc is not None
    os.kill(proc.proc.pid, sig)


def wait_log(proc: SsefanProcess, text: str, count: int = 1) -> None:
    wait_until(lambda: proc.log_text().count(text) >= count, DEFAULT_TIMEOUT, repr(text))


def short_socket_path(tmp_path: Path, name: str) -> str:
    """A Unix socket path under the 108-byte sun_path limit, whatever tmp_path is."""
    path = tmp_path / name
    if len(os.fsencode(path)) < 100:
        return str(path)
    return f"@ssefan-test-{os.getpid()}-{name}"
