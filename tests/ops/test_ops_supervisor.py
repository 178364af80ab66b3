"""The supervisor's own robustness: who it listens to on its notify socket,
restarting a worker when starting it fails, and the config memfd never
showing a worker a half-written config."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sse_upstream import FakeUpstream
from ssefan_process import route_config, write_config
from waits import DEFAULT_TIMEOUT

from ssefan.config import ConfigError, parse_config
from ssefan.ops import supervisor as supervisor_module
from ssefan.ops import worker as worker_module
from ssefan.ops.supervisor import Supervisor
from ssefan.ops.worker import read_fd, unix_address

# A child that sends N notify datagrams, says so, and waits for its stdin to close.
SENDER = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "address = b'\\0' + sys.argv[1].encode()\n"
    "for _ in range(int(sys.argv[2])):\n"
    "    s.sendto(b'LISTENING=1\\nREADY=1', address)\n"
    "print('sent', flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def supervisor(upstream: FakeUpstream, tmp_path: Path) -> Iterator[Supervisor]:
    path = write_config(tmp_path / "s.yaml", {**route_config(upstream), "workers": 1})
    text = path.read_text()
    sup = Supervisor(parse_config(text, str(path)), text, ["--log-level", "info"])
    try:
        yield sup
    finally:
        if sup._notify.fileno() != -1:  # run() closes everything itself
            sup._close()


def notify_name(sup: Supervisor) -> str:
    return f"{sup._token}/notify"


def send_from_child(
    sup: Supervisor, count: int, python: str = sys.executable, **popen: object
) -> subprocess.Popen[str]:
    child: subprocess.Popen[str] = subprocess.Popen(
        [python, "-c", SENDER, notify_name(sup), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **popen,  # type: ignore[call-overload]
    )
    assert child.stdout is not None
    # The socket queues a few datagrams only (net.unix.max_dgram_qlen): read
    # them as they come until the child says it sent them all.
    deadline = time.monotonic() + DEFAULT_TIMEOUT
    while not select.select([child.stdout], [], [], 0.01)[0]:
        assert time.monotonic() < deadline, "the child did not send its messages"
        sup._on_notify()
    assert child.stdout.readline().strip() == "sent"  # and still running: its pid is ours
    sup._on_notify()
    return child


def end(child: subprocess.Popen[str]) -> None:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.close()
    child.wait(DEFAULT_TIMEOUT)
    child.stdout.close()


def test_notify_datagrams_from_strangers_are_neither_applied_nor_kept(
    supervisor: Supervisor,
) -> None:
    # This test process is not a child of the supervisor (it is the supervisor's
    # own pid, which no worker has): a stranger, as any local process can be.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    address = unix_address("@" + notify_name(supervisor))
    try:
        sent = 0
        while sent < 200:
            try:
                sock.sendto(b"LISTENING=1\nREADY=1", address)
                sent += 1
            except BlockingIOError:
                supervisor._on_notify()  # the queue is short: take what is there
    finally:
        sock.close()
    supervisor._on_notify()
    assert supervisor._early == {}, "a stranger's messages were buffered"
    assert not any(w.listening or w.ready for w in supervisor.workers)

    # A child of ours not yet known as a worker (one still being spawned):
    # kept for when its pid is known, but only a few messages.
    child = send_from_child(supervisor, 100)
    try:
        assert len(supervisor._early[child.pid]) == supervisor_module.EARLY_MESSAGES_KEPT
    finally:
        end(child)


# Another user can't run this venv's interpreter: the system's will do (stdlib only).
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(
    os.geteuid() != 0 or SYSTEM_PYTHON is None,
    reason="needs root (to start a child as another user) and a system python3",
)
def test_notify_datagrams_from_another_user_are_ignored(supervisor: Supervisor) -> None:
    # Our child, so only the uid check can refuse it.
    assert SYSTEM_PYTHON is not None
    child = send_from_child(supervisor, 5, SYSTEM_PYTHON, user=65534, group=65534)
    try:
        assert supervisor._early == {}
    finally:
        end(child)


async def until(sup: Supervisor, condition: Callable[[], bool], what: str) -> None:
    """Wait for `condition`, looking again on every worker message or exit."""
    try:
        async with asyncio.timeout(DEFAULT_TIMEOUT):
            while True:
                sup._changed.clear()
                if condition():
                    return
                await sup._changed.wait()
    except TimeoutError:
        raise AssertionError(f"no {what} within {DEFAULT_TIMEOUT}s") from None


def test_a_failed_restart_is_retried_with_backoff(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "RESTART_DELAY", (0.05, 0.2))
    worker = supervisor.workers[0]

    async def scenario() -> list[int]:
        running = asyncio.ensure_future(supervisor.run())
        await until(supervisor, lambda: worker.listening, "worker listening")
        first = worker.pid
        assert first is not None
        real = asyncio.create_subprocess_exec
        attempts: list[int] = []

        async def fails_once(*args: object, **kwargs: object) -> asyncio.subprocess.Process:
            attempts.append(1)
            if len(attempts) == 1:
                raise OSError(errno.EAGAIN, "fork failed (the test's doing)")
            return await real(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(asyncio, "create_subprocess_exec", fails_once)
        os.kill(first, signal.SIGKILL)
        await until(
            supervisor,
            lambda: worker.pid not in (None, first) and worker.listening,
            "restarted worker",
        )
        supervisor.stopping.set()
        await running
        return attempts

    assert len(asyncio.run(scenario())) == 2
    assert supervisor.workers[0].restarts == 1


def test_a_reload_never_shows_a_starting_worker_a_partial_config(
    supervisor: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = read_fd(supervisor._config_fd)
    new = "# shorter\n" + old[: len(old) // 2]  # its tail is the old version's
    seen: list[str] = []

    def spying(call: Callable[..., object]) -> Callable[..., object]:
        def spy(fd: int, *args: object) -> object:
            result = call(fd, *args)
            if fd == supervisor._config_fd:
                seen.append(read_fd(fd))  # what a worker starting right now reads
            return result

        return spy

    monkeypatch.setattr(os, "pwrite", spying(os.pwrite))
    monkeypatch.setattr(os, "ftruncate", spying(os.ftruncate))
    supervisor._write_config(new)
    monkeypatch.undo()
    assert seen and all(text in (old, new) for text in seen), seen
    assert read_fd(supervisor._config_fd) == new


def test_a_config_caught_mid_write_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "CONFIG_READ_ATTEMPTS", 3)
    fd = os.memfd_create("test-config")
    try:
        whole = worker_module.encode_config("listen: 127.0.0.1:0\nroutes: []\n")
        os.write(fd, whole[:-5])  # the header says more than has arrived
        with pytest.raises(ConfigError):
            read_fd(fd)
        os.pwrite(fd, whole[:-5] + b"XXXXX", 0)  # as long, but not these bytes
        with pytest.raises(ConfigError):
            read_fd(fd)
        os.pwrite(fd, whole, 0)
        assert read_fd(fd) == "listen: 127.0.0.1:0\nroutes: []\n"
    finally:
        os.close(fd)
