"""What the ops tests observe of a running ssefan besides its streams: sd_notify, admin, metrics.

* `NotifyReceiver`: the datagram socket systemd would hand over as NOTIFY_SOCKET.
* `admin_url`, `get`: the admin endpoints, fetched with urllib (another
  HTTP client than ssefan's and the tests' own).
* `scrape`, `value`, `maybe`: /metrics parsed by prometheus_client's parser.

Starting and signalling ssefan itself is `ssefan_process`.
"""

from __future__ import annotations

import os
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from ssefan_process import SsefanProcess
from waits import DEFAULT_TIMEOUT, wait_until

ADMIN_LINE = re.compile(r"admin endpoints at (http://\S+)")


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


def short_socket_path(tmp_path: Path, name: str) -> str:
    """A Unix socket path under the 108-byte sun_path limit, whatever tmp_path is."""
    path = tmp_path / name
    if len(os.fsencode(path)) < 100:
        return str(path)
    return f"@ssefan-test-{os.getpid()}-{name}"
