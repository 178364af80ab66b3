"""A worker's side of the supervisor contract (see supervisor.py).

A supervisor starts each worker as `python -m ssefan serve --config FILE` with
these variables, all set together:

    SSEFAN_WORKER=N          this process is worker N (0-based)
    SSEFAN_CONFIG_FD=fd      a memfd holding the config text the supervisor
                             validated; read again on SIGHUP, so every worker
                             runs exactly what the supervisor checked, even if
                             the file changed since
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

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from .config import Config, parse_config
from .sockets import adopt, bind_listener

__all__ = ["WorkerEnv"]

ENV_WORKER = "SSEFAN_WORKER"
ENV_CONFIG_FD = "SSEFAN_CONFIG_FD"
ENV_PARENT_FD = "SSEFAN_PARENT_FD"
ENV_LISTEN_FD = "SSEFAN_LISTEN_FD"
ENV_REUSEPORT = "SSEFAN_REUSEPORT"
ENV_ADMIN_SOCKET = "SSEFAN_ADMIN_SOCKET"
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


def read_fd(fd: int) -> str:
    """All of a (mem)file's text, read from offset 0 whatever the file position."""
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0).decode("utf-8")


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
