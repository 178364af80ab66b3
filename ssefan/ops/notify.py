"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET.

The protocol is a few newline-separated `KEY=VALUE` assignments per datagram
sent to the AF_UNIX socket named in `NOTIFY_SOCKET` (a path, or `@name` for
the abstract namespace). systemd reads READY=1, STATUS=, WATCHDOG=1,
RELOADING=1 (+ MONOTONIC_USEC=) and STOPPING=1; the ssefan supervisor reads
the same messages from its workers, so a worker is supervised exactly the way
systemd supervises a single process.

Nothing here raises when systemd is absent: a notifier without a socket is a
no-op, and a failed send is logged once, never fatal (systemd's own
sd_notify() also just returns an error the caller may ignore).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("ssefan.notify")


def _address(value: str) -> str | bytes:
    # sd_notify(3): a leading '@' means Linux's abstract namespace, which the
    # socket API spells with a leading NUL byte.
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages; every method is a no-op without a socket."""

    def __init__(self, address: str | None) -> None:
        self.address = address or None
        self._sock: socket.socket | None = None
        self._failed = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        value = environ.get("NOTIFY_SOCKET", "")
        # Only AF_UNIX sockets are in use by systemd (vsock addresses exist for
        # VMs and are out of scope for a sidecar).
        return cls(value if value.startswith(("/", "@")) else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """Send one datagram of KEY=VALUE lines (keys given in upper case)."""
        if self._sock is None or self.address is None:
            return False
        text = "\n".join(f"{key}={value}" for key, value in fields.items())
        try:
            self._sock.sendto(text.encode("utf-8"), _address(self.address))
        except OSError as exc:
            if not self._failed:  # one line, not one per watchdog tick
                log.warning("sd_notify to %s failed: %s", self.address, exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        fields: dict[str, str | int] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = _one_line(status)
        return self.send(**fields)

    def status(self, status: str) -> bool:
        return self.send(STATUS=_one_line(status))

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) wants MONOTONIC_USEC alongside
        # RELOADING=1 to tell this reload from an earlier one; older versions
        # ignore the extra field.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new assignment in the datagram.
    return " ".join(text.split())


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is armed.

    sd_watchdog_enabled(3): WATCHDOG_USEC is the deadline; WATCHDOG_PID, when
    set, names the one process it is meant for (not, say, a child that
    inherited the environment). Pinging at half the deadline, as the man page
    recommends, leaves room for one late tick.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2
