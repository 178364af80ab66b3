"""Where the listening socket comes from: systemd, the supervisor, or a bind.

* systemd socket activation (sd_listen_fds(3)): `LISTEN_PID` names this
  process and `LISTEN_FDS` counts the sockets passed from fd 3 on. systemd
  keeps its own copy, so a restart never closes the port: connections that
  arrive meanwhile wait in the backlog for the next instance.
* A worker of ssefan's supervisor gets either the same passed fd
  (`SSEFAN_LISTEN_FD`) or a port to bind its own `SO_REUSEPORT` socket to
  (`SSEFAN_REUSEPORT`), so the kernel spreads connections over the workers.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import MutableMapping

__all__ = [
    "LISTEN_BACKLOG",
    "SD_LISTEN_FDS_START",
    "bind_listener",
    "reserve_port",
    "systemd_listener",
]

log = logging.getLogger("ssefan")

# sd_listen_fds(3): passed sockets start at fd 3 (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3
# Pending connections the kernel queues for us. A reconnect storm of thousands
# of browsers arrives within a second; 4096 is also nginx's default on Linux.
LISTEN_BACKLOG = 4096


def systemd_listener(environ: MutableMapping[str, str] = os.environ) -> socket.socket | None:
    """The first socket systemd passed to this process, or None.

    The variables are removed afterwards, as sd_listen_fds(unset_environment=1)
    does, so no child process mistakes them for its own.
    """
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid() or int(count) < 1:
        return None
    if int(count) > 1:
        log.warning(
            "systemd passed %s sockets; ssefan serves on the first (fd %d) and ignores the rest",
            count,
            SD_LISTEN_FDS_START,
        )
    for extra in range(SD_LISTEN_FDS_START + 1, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(extra, False)
    return adopt(SD_LISTEN_FDS_START)


def adopt(fd: int) -> socket.socket:
    """A listening TCP socket from an inherited fd; ValueError if it is not one."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ValueError(f"fd {fd} is not a listening stream socket")
    sock.setblocking(False)
    return sock


def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[object, ...]]:
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    return family, address


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind, without listening, a `SO_REUSEPORT` socket: it fixes the port
    (port 0 becomes a real one) for workers to bind their own sockets to, and
    keeps it ours while workers restart. A socket that does not listen is in
    no accept queue, so it takes none of the workers' connections."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket on the first address `host` gives."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
