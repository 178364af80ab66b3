"""Processes the benchmark starts: the synthetic upstream and each server under test.

Every process binds 127.0.0.1 only, gets RLIMIT_NOFILE raised and its CPU
affinity set before exec, logs to a file in the run's work directory, and is
stopped (SIGTERM, then SIGKILL after a grace period) by the same object that
started it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from .common import HOST, free_port, raise_nofile

__all__ = [
    "SERVER_KINDS",
    "Managed",
    "NaiveServer",
    "NchanServer",
    "SsefanServer",
    "StarletteServer",
    "UpstreamProcess",
    "ensure_nchan",
    "make_server",
]

SERVER_KINDS = ("ssefan", "naive", "starlette", "nchan", "ssefan-state")
# What `--servers` runs unless told: ssefan-state (ssefan with state_dir, for
# the cost of journaling on the hot path) is asked for by name.
DEFAULT_SERVERS = ("ssefan", "naive", "starlette", "nchan")
REPO = Path(__file__).resolve().parent.parent
STOP_GRACE = 10.0


def _preexec(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


class Managed:
    """One subprocess with its log file; stop() always reaps it."""

    def __init__(
        self, name: str, argv: list[str], workdir: Path, cpus: frozenset[int] | None
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            preexec_fn=_preexec(cpus),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_for_line(self, marker: str, timeout: float = 30.0) -> str:
        """The first log line containing `marker` (fails if the process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            for line in text.splitlines():
                if marker in line:
                    return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}):\n{text[-2000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {marker!r} in {timeout}s (see {self.log_path})")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_GRACE)
        self._log.close()


def _get_json(url: str, timeout: float = 10.0) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data: dict[str, object] = json.loads(response.read())
        return data


class UpstreamProcess:
    """`python -m bench.upstream`: the synthetic app and nchan publisher."""

    def __init__(
        self,
        workdir: Path,
        cpus: frozenset[int] | None,
        *,
        size: int,
        publish_to: str = "",
    ) -> None:
        argv = [sys.executable, "-m", "bench.upstream", "--size", str(size)]
        if publish_to:
            argv += ["--publish-to", publish_to]
        self.managed = Managed("upstream", argv, workdir, cpus)
        line = self.managed.wait_for_line("upstream listening on")
        self.port = int(line.rsplit(" ", 1)[1])
        self.url = f"http://{HOST}:{self.port}/events"
        # A template route's upstream: the app's per-key stream.
        self.keyed_url = f"http://{HOST}:{self.port}/jobs/{{job}}/progress"

    @property
    def pid(self) -> int:
        return self.managed.pid

    def stats(self) -> dict[str, object]:
        return _get_json(f"http://{HOST}:{self.port}/stats")

    def set_rate(self, rate: float, keys: int | None = None) -> dict[str, object]:
        """R events/s per key from now on; `keys` switches the publishing feeds
        (0: the static /events, K: the keys k0 .. kK-1)."""
        query = f"rate={rate:g}" + (f"&keys={keys}" if keys is not None else "")
        return _get_json(f"http://{HOST}:{self.port}/control?{query}")

    def stop(self) -> None:
        self.managed.stop()


class ServerBase:
    """The server under test. `pids` are the processes whose CPU and RSS count."""

    kind = ""
    path = "/events"
    # A template route's client path ("{key}" is a key's name); "" = none.
    key_path = ""
    # A server that takes events from the synthetic publisher (nchan) rather
    # than subscribing to the synthetic upstream's stream.
    publisher_path = ""
    port = 0

    def start(self, upstream: UpstreamProcess | None) -> None:
        raise NotImplementedError

    @property
    def pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def wait_accepting(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


class SsefanServer(ServerBase):
    kind = "ssefan"
    key_path = "/jobs/{key}/progress"
    # The template route as ssefan's metrics label it.
    template = "/jobs/{job}/progress"
    # A template route's ring per key: the example size. 1000 keys x
    # 200 events x ~250 B stays far under ring_bytes_total (256 MiB).
    KEY_BUFFER = 200
    # Live keys ssefan may hold: above every scenario's keys + lingering ones.
    MAX_CHANNELS = 20_000

    def __init__(
        self,
        workdir: Path,
        cpus: frozenset[int] | None,
        *,
        keyed: bool = False,
        linger: float = 1.0,
    ) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.keyed = keyed
        self.linger = linger
        self.managed: Managed | None = None
        self.admin_port = free_port()

    def config_text(self, upstream: UpstreamProcess) -> str:
        # Keys are ssefan's config dataclass fields; defaults everywhere else.
        # No drain window: the benchmark's clients are gone before it stops ssefan.
        head = (
            "listen: 127.0.0.1:0\n"
            "max_clients: 100000\n"
            "drain_window: 0s\n"
            "shutdown_timeout: 5s\n"
            f"admin: {{listen: {HOST}:{self.admin_port}}}\n"
            "routes:\n"
        )
        if self.keyed:
            # One channel (ring, heartbeat, upstream subscription) per key,
            # freed `linger` after the key's last client.
            return head.replace("routes:", f"max_channels: {self.MAX_CHANNELS}\nroutes:") + (
                f"  - path: {self.template}\n"
                f"    upstream: {upstream.keyed_url}\n"
                f"    buffer: {self.KEY_BUFFER}\n"
                "    heartbeat: 15s\n"
                f"    linger: {self.linger * 1000:.0f}ms\n"
            )
        return head + (
            "  - path: /events\n"
            f"    upstream: {upstream.url}\n"
            "    buffer: 1000\n"
            "    heartbeat: 15s\n"
        )

    def metrics(self) -> dict[str, float]:
        """ssefan's own Prometheus counters ({"name{labels}": value}); {} if unavailable."""
        url = f"http://{HOST}:{self.admin_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10.0) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def start(self, upstream: UpstreamProcess | None) -> None:
        assert upstream is not None
        config = self.workdir / "ssefan.yaml"
        config.write_text(self.config_text(upstream))
        argv = [sys.executable, "-m", "ssefan", "serve", "--config", str(config)]
        self.managed = Managed("ssefan", argv, self.workdir, self.cpus)
        line = self.managed.wait_for_line("ssefan listening on http://")
        address = line.split("ssefan listening on http://", 1)[1].split()[0]
        self.port = int(address.rsplit(":", 1)[1])

    @property
    def pids(self) -> list[int]:
        return [self.managed.pid] if self.managed else []

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop()


class SsefanStateServer(SsefanServer):
    """ssefan with `state_dir` in its work directory: every ring journaled."""

    kind = "ssefan-state"

    def config_text(self, upstream: UpstreamProcess) -> str:
        state = self.workdir / "state"
        state.mkdir(parents=True, exist_ok=True)
        return f"state_dir: {state}\nstate_sync: 1s\n" + super().config_text(upstream)


class NaiveServer(ServerBase):
    """No server: clients connect straight to the synthetic upstream."""

    kind = "naive"

    def __init__(self) -> None:
        self.upstream: UpstreamProcess | None = None

    def start(self, upstream: UpstreamProcess | None) -> None:
        assert upstream is not None
        self.upstream = upstream
        self.port = upstream.port

    @property
    def pids(self) -> list[int]:
        return [self.upstream.pid] if self.upstream else []

    def stop(self) -> None:
        pass  # the upstream is stopped by its owner


class StarletteServer(ServerBase):
    kind = "starlette"

    def __init__(self, workdir: Path, cpus: frozenset[int] | None) -> None:
        self.workdir = workdir
        self.cpus = cpus
        self.managed: Managed | None = None

    def start(self, upstream: UpstreamProcess | None) -> None:
        assert upstream is not None
        argv = [sys.executable, "-m", "bench.starlette_app", "--upstream", upstream.url]
        self.managed = Managed("starlette", argv, self.workdir, self.cpus)
        line = self.managed.wait_for_line("starlette listening on")
        self.port = int(line.rsplit(" ", 1)[1])
        self.wait_accepting()

    @property
    def pids(self) -> list[int]:
        return [self.managed.pid] if self.managed else []

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop()


def nchan_module() -> str | None:
    found = glob.glob("/usr/lib/nginx/modules/ngx_nchan_module.so")
    return found[0] if found else None


def ensure_nchan(allow_install: bool) -> tuple[bool, str]:
    """(usable, note). Installs nginx + libnginx-mod-nchan with apt-get if allowed."""
    if shutil.which("nginx") and nchan_module():
        return True, "nginx and libnginx-mod-nchan already installed"
    if not allow_install:
        return False, "nginx/nchan not installed and --no-install given"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False, "nginx/nchan not installed, and apt-get as root is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "nginx", "libnginx-mod-nchan"]
    result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:  # stale or missing package lists: update once, retry
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        result = subprocess.run(install, env=env, capture_output=True, text=True, timeout=600)
    # Debian's postinst may start the stock nginx service (unless policy-rc.d
    # forbids it); we never use it, and it listens on :80 -- leave it alone.
    if shutil.which("nginx") and nchan_module():
        return True, "installed nginx and libnginx-mod-nchan with apt-get"
    return False, "apt-get could not install nginx + libnginx-mod-nchan: " + result.stderr[-300:]


NGINX_CONF = """\
load_module {module};
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{
    worker_connections {connections};
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # The publisher pipelines every event on one keep-alive connection.
    keepalive_timeout 3600s;
    keepalive_requests 1000000000;
    server {{
        listen {host}:{port} backlog=4096;
        location = /sub {{
            nchan_subscriber eventsource;
            nchan_channel_id bench;
            nchan_subscriber_first_message newest;
            nchan_message_buffer_length 2000;
            nchan_message_timeout 1h;
        }}
        location = /pub {{
            nchan_publisher;
            nchan_channel_id bench;
            nchan_message_buffer_length 2000;
            nchan_message_timeout 1h;
        }}
        # Per-key channels (template routes' counterpart): /sub/<key>, /pub/<key>.
        location ~ ^/sub/([A-Za-z0-9_-]+)$ {{
            nchan_subscriber eventsource;
            nchan_channel_id $1;
            nchan_subscriber_first_message newest;
            nchan_message_buffer_length {key_buffer};
            nchan_message_timeout 1h;
        }}
        location ~ ^/pub/([A-Za-z0-9_-]+)$ {{
            nchan_publisher;
            nchan_channel_id $1;
            nchan_message_buffer_length {key_buffer};
            nchan_message_timeout 1h;
        }}
    }}
}}
"""


class NchanServer(ServerBase):
    """nginx + nchan: worker_processes 1, own config, pid file and logs in workdir."""

    kind = "nchan"
    path = "/sub"
    key_path = "/sub/{key}"
    publisher_path = "/pub"

    def __init__(self, workdir: Path, cpus: frozenset[int] | None, nofile: int) -> None:
        self.workdir = workdir / "nginx"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o755)
        self.cpus = cpus
        self.nofile = nofile
        self.managed: Managed | None = None
        self.port = free_port()

    def start(self, upstream: UpstreamProcess | None) -> None:
        module = nchan_module()
        assert module is not None
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(
                module=module,
                tmp=self.workdir,
                nofile=self.nofile,
                # Connections, not descriptors: nchan takes more than one
                # connection slot per subscriber at 20k (nginx warns "worker_
                # connections are not enough" at nofile - 16), so give it twice.
                connections=2 * self.nofile,
                host=HOST,
                port=self.port,
                key_buffer=SsefanServer.KEY_BUFFER,
            )
        )
        error_log = f"{self.workdir}/error.log"
        argv = ["nginx", "-p", str(self.workdir), "-c", str(conf), "-e", error_log]
        self.managed = Managed("nginx", argv, self.workdir, self.cpus)
        self.wait_accepting()

    @property
    def publish_url(self) -> str:
        return f"http://{HOST}:{self.port}{self.publisher_path}"

    @property
    def pids(self) -> list[int]:
        if self.managed is None:
            return []
        master = self.managed.pid
        try:
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        except OSError:
            children = []
        return [int(c) for c in children] or [master]

    def stop(self) -> None:
        if self.managed is not None:
            self.managed.stop(signal.SIGTERM)  # nginx: fast shutdown


def make_server(
    kind: str,
    workdir: Path,
    cpus: frozenset[int] | None,
    nofile: int,
    *,
    keyed: bool = False,
    linger: float = 1.0,
) -> ServerBase:
    """The server under test; `keyed`: ssefan serves the template route instead."""
    if kind == "ssefan":
        return SsefanServer(workdir, cpus, keyed=keyed, linger=linger)
    if kind == "ssefan-state":
        return SsefanStateServer(workdir, cpus, keyed=keyed, linger=linger)
    if kind == "naive":
        return NaiveServer()
    if kind == "starlette":
        return StarletteServer(workdir, cpus)
    if kind == "nchan":
        return NchanServer(workdir, cpus, nofile)
    raise ValueError(f"unknown server {kind!r}; expected one of {', '.join(SERVER_KINDS)}")
