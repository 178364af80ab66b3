"""A worker's side of the supervisor contract (see supervisor.py).

A supervisor starts each worker as `python -m ssefan serve --config FILE` with
these variables, all set together:

    SSEFAN_WORKER=N          this process is worker N (0-based)
    SSEFAN_CONFIG_FD=fd      a memfd holding the config text the supervisor
                             validated; read again on SIGHUP, so every worker
                             runs exactly what the supervisor checked, even if
                             the file changed since (with a checksum header,
                             see encode_config)
    SSEFAN_PARENT_FD=fd      the read end of a pipe only the supervisor can
                             write to: EOF means the supervisor is gone, and
                             the worker drains and exits instead of lingering
    SSEFAN_LISTEN_FD=fd      share this listening socket (socket activation), or
    SSEFAN_REUSEPORT=port    bind an own SO_REUSEPORT socket to this port
    SSEFAN_ADMIN_SOCKET=@x   (optional) serve the admin endpoints on this
                             abstract Unix socket, where the supervisor
                             collects metrics
    NOTIFY_SOCKET, WATCHDOG_USEC
                             sd_notify to the supervisor, as to systemd
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from ssefan.config import Config, ConfigError, parse_config
from ssefan.ops.sockets import adopt, bind_listener

__all__ = ["WorkerEnv"]

ENV_WORKER = "SSEFAN_WORKER"
ENV_CONFIG_FD = "SSEFAN_CONFIG_FD"
ENV_PARENT_FD = "SSEFAN_PARENT_FD"
ENV_LISTEN_FD = "SSEFAN_LISTEN_FD"
ENV_REUSEPORT = "SSEFAN_REUSEPORT"
ENV_ADMIN_SOCKET = "SSEFAN_ADMIN_SOCKET"
# The memfd holds CONFIG_HEADER + the text. The supervisor rewrites it in place
# on reload while a worker may be starting and reading it; a reader that
# catches the write half done sees a checksum that doesn't match and reads
# again, rather than starting on an empty, cut or mixed config. The write
# takes microseconds: this many reads are plenty.
CONFIG_HEADER = "ssefan-config sha256={digest} length={length}\n"
CONFIG_READ_ATTEMPTS = 1000
ALL_VARIABLES = (
    ENV_WORKER,
    ENV_CONFIG_FD,
    ENV_PARENT_FD,
    ENV_LISTEN_FD,
    ENV_REUSEPORT,
    ENV_ADMIN_SOCKET,
)


@dataclass(frozen=True, slots=True)
class WorkerEnv:
    index: int
    config_fd: int
    parent_fd: int
    listen_fd: int | None
    reuse_port: int | None
    admin_socket: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerEnv | None:
        """The contract, or None when this process was not started by a supervisor."""
        if ENV_WORKER not in environ:
            return None

        def number(name: str) -> int | None:
            value = environ.get(name, "")
            return int(value) if value.isdigit() else None

        index, config_fd, parent_fd = (
            number(ENV_WORKER),
            number(ENV_CONFIG_FD),
            number(ENV_PARENT_FD),
        )
        if index is None or config_fd is None or parent_fd is None:
            raise RuntimeError(f"{ENV_WORKER} is set but the supervisor's variables are not")
        return cls(
            index=index,
            config_fd=config_fd,
            parent_fd=parent_fd,
            listen_fd=number(ENV_LISTEN_FD),
            reuse_port=number(ENV_REUSEPORT),
            admin_socket=environ.get(ENV_ADMIN_SOCKET) or None,
        )

    def load_config(self, source: str) -> Config:
        """The config the supervisor validated last (ConfigError if it is not valid)."""
        return parse_config(read_fd(self.config_fd), source)

    def listener(self, config: Config) -> socket.socket:
        if self.listen_fd is not None:
            return adopt(self.listen_fd)
        port = self.reuse_port if self.reuse_port is not None else config.listen.port
        return bind_listener(config.listen.host, port, reuse_port=True)

    def admin_listener(self) -> socket.socket | None:
        if self.admin_socket is None:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(unix_address(self.admin_socket))
        sock.listen()
        sock.setblocking(False)
        return sock


def encode_config(text: str) -> bytes:
    """What the supervisor writes to the memfd for `text` (see CONFIG_HEADER)."""
    data = text.encode("utf-8")
    digest = hashlib.sha256(data).hexdigest()
    return CONFIG_HEADER.format(digest=digest, length=len(data)).encode("ascii") + data


def read_fd(fd: int) -> str:
    """The config text in the supervisor's memfd (read from offset 0 whatever
    the file position): the one whole version written last, never part of one.

    The supervisor writes the new version over the old one, then truncates
    to its length: whatever is past the length the header gives is the old
    version's tail, and a version still being written fails its checksum."""
    for _ in range(CONFIG_READ_ATTEMPTS):
        size = os.fstat(fd).st_size
        text = _decode_config(os.pread(fd, size, 0))
        if text is not None:
            return text
        os.sched_yield()
    raise ConfigError(["the config the supervisor passed could not be read whole"])


def _decode_config(data: bytes) -> str | None:
    head, newline, rest = data.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if not newline or len(parts) != 3 or parts[0] != "ssefan-config":
        return None
    digest, length = parts[1].removeprefix("sha256="), parts[2].removeprefix("length=")
    if not length.isdigit() or len(rest) < int(length):
        return None
    body = rest[: int(length)]
    if hashlib.sha256(body).hexdigest() != digest:
        return None
    return body.decode("utf-8")


def unix_address(name: str) -> str | bytes:
    """`@name` is Linux's abstract namespace (no file to clean up), else a path."""
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def inherited_config(source: str) -> Config | None:
    """In a worker: the supervisor's config (ConfigError if invalid); else None."""
    worker = WorkerEnv.from_env()
    return None if worker is None else worker.load_config(source)


def log_fields() -> dict[str, str]:
    """Fields every log line of this process carries (`worker=N` in a worker)."""
    index = os.environ.get(ENV_WORKER, "")
    return {"worker": index} if index.isdigit() else {}
