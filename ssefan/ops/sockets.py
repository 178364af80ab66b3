"""Where the listening socket comes from: systemd, the supervisor, or a bind.

* systemd socket activation (sd_listen_fds(3)): `LISTEN_PID` names this
  process and `LISTEN_FDS` counts the sockets passed from fd 3 on. systemd
  keeps its own copy, so a restart never closes the port: connections that
  arrive meanwhile wait in the backlog for the next instance.
* A worker of ssefan's supervisor gets either the same passed fd
  (`SSEFAN_LISTEN_FD`) or a port to bind its own `SO_REUSEPORT` socket to
  (`SSEFAN_REUSEPORT`), so the kernel spreads connections over the workers.

An address that can't be bound (in use, not this host's, a privileged port)
is a `ListenError`: one line naming the address and, when the kernel tells,
the process holding it, for the CLI to print instead of a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import socket
from collections.abc import Callable, Iterator, MutableMapping

__all__ = [
    "LISTEN_BACKLOG",
    "SD_LISTEN_FDS_START",
    "ListenError",
    "bind_listener",
    "http_url",
    "listen_error",
    "port_holder",
    "reserve_port",
    "systemd_listener",
]

log = logging.getLogger("ssefan")

# sd_listen_fds(3): passed sockets start at fd 3 (after stdin, stdout, stderr).
SD_LISTEN_FDS_START = 3
# Pending connections the kernel queues for us. A reconnect storm of thousands
# of browsers arrives within a second; 4096 is also nginx's default on Linux.
LISTEN_BACKLOG = 4096


def http_url(host: str, port: int, *, tls: bool = False) -> str:
    """The http:// (https:// with `tls`) URL of a listening address; an IPv6
    host goes in brackets (RFC 3986 §3.2.2)."""
    scheme = "https" if tls else "http"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


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


# Bind failures the person running ssefan can fix, and what each means. Any
# other OSError is not a matter of choosing an address and surfaces as it is.
_LISTEN_PROBLEMS = {
    errno.EADDRINUSE: "the address is in use",
    errno.EADDRNOTAVAIL: "the address is not one of this host's",
    errno.EACCES: "permission denied (a port below 1024 needs root or CAP_NET_BIND_SERVICE)",
}
# /proc/net/tcp's state column for a listening socket (include/net/tcp_states.h).
_TCP_LISTEN = "0A"


class ListenError(OSError):
    """`setting` (`listen`, `admin.listen`) names an address that can't be
    bound. A local misuse: the config or the command line must change, so the
    message is one line, no traceback."""

    def __init__(
        self, setting: str, host: str, port: int, code: int, problem: str, holder: str | None
    ) -> None:
        super().__init__(code, problem)
        self.setting = setting
        self.host = host
        self.port = port
        self.problem = problem
        self.holder = holder

    @property
    def in_use(self) -> bool:
        return self.errno == errno.EADDRINUSE

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        held = f", held by {self.holder}" if self.holder else ""
        return f"cannot listen on {self.address}: {self.problem}{held}"


def listen_error(setting: str, host: str, port: int, exc: OSError) -> ListenError | None:
    """`exc` from binding host:port as a ListenError, or None if it is not
    about the address (then it should surface as it is)."""
    if isinstance(exc, ListenError):
        return exc
    problem = _LISTEN_PROBLEMS.get(exc.errno or 0)
    if problem is None:
        return None
    holder = port_holder(port) if exc.errno == errno.EADDRINUSE else None
    return ListenError(setting, host, port, exc.errno or 0, problem, holder)


def port_holder(port: int, proc: str = "/proc") -> str | None:
    """Who listens on TCP `port`: "pid 4242 (nginx)", "a process of user
    www-data" when its fds are not ours to read, or None when unknown.

    Best effort, Linux only: /proc/net/tcp{,6} map the port to a socket inode
    and /proc/PID/fd to the process holding it; whatever can't be read is
    skipped silently, since this only decorates an error message."""
    owners = dict(_listening_inodes(port, proc))
    if not owners:
        return None
    targets = {f"socket:[{inode}]": inode for inode in owners}
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        pids = []
    for pid in pids:
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except OSError:  # not ours to look into, or gone meanwhile
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{proc}/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in targets:
                return f"pid {pid} ({_command(proc, pid)})"
    uid = next(iter(owners.values()))
    try:
        return f"a process of user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"a process of uid {uid}"


def _listening_inodes(port: int, proc: str) -> Iterator[tuple[str, int]]:
    """(socket inode, owner uid) of each TCP socket listening on `port`."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"{proc}/net/{table}", encoding="ascii") as lines:
                rows = lines.read().splitlines()[1:]  # the first line is a header
        except (OSError, UnicodeDecodeError):
            continue
        for row in rows:
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            fields = row.split()
            if len(fields) < 10 or fields[3] != _TCP_LISTEN:
                continue
            _, _, local_port = fields[1].rpartition(":")
            try:
                if int(local_port, 16) == port and fields[9] != "0":
                    yield fields[9], int(fields[7])
            except ValueError:
                continue


def _command(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as comm:
            return comm.read().strip() or "?"
    except OSError:
        return "?"


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

    def reserve(sock: socket.socket, address: tuple[object, ...]) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)

    return _bound("listen", host, port, reserve)


def bind_listener(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A listening, non-blocking TCP socket on the first address `host` gives."""

    def listen(sock: socket.socket, address: tuple[object, ...]) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)

    return _bound("listen", host, port, listen)


def _bound(
    setting: str,
    host: str,
    port: int,
    setup: Callable[[socket.socket, tuple[object, ...]], None],
) -> socket.socket:
    """A TCP socket for `host:port` set up by `setup`; a bind that fails for a
    reason people can act on (in use, no such address, no permission) is a
    ListenError naming `setting`, and the socket is closed on any failure."""
    family, address = _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        setup(sock, address)
    except OSError as exc:
        sock.close()
        problem = listen_error(setting, host, port, exc)
        if problem is None:
            raise
        raise problem from exc
    except BaseException:
        sock.close()
        raise
    return sock
