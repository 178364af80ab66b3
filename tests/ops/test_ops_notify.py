"""sd_notify: the messages systemd would read, from a real datagram socket."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from opsharness import NotifyReceiver, short_socket_path
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, route_config, signal_proc, wait_log, write_config

from ssefan.ops.notify import Notifier, watchdog_interval

# --- the notifier in memory -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notifier_sends_key_value_lines(tmp_path: Path, kind: str) -> None:
    address = (
        short_socket_path(tmp_path, "n.sock")
        if kind == "path"
        else f"@ssefan-test-{os.getpid()}-notify"
    )
    receiver = NotifyReceiver.bind(address)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address})
    try:
        assert notifier.ready("3 clients\non 2 routes")
        assert notifier.watchdog()
        assert notifier.reloading()
        assert notifier.stopping()
        receiver.wait_for(lambda m: "STOPPING" in m, "four messages")
        ready, ping, reloading, stopping = receiver.messages
        assert ready == {"READY": "1", "STATUS": "3 clients on 2 routes"}
        assert ping == {"WATCHDOG": "1"}
        assert reloading["RELOADING"] == "1"
        # CLOCK_MONOTONIC in microseconds, as systemd >= 253 compares it.
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert 0 < now - int(reloading["MONOTONIC_USEC"]) < 10_000_000
        assert stopping == {"STOPPING": "1"}
    finally:
        notifier.close()
        receiver.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.watchdog()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert not notifier.ready()  # logged once, never raised
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="half-of-30s"),
        pytest.param({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "junk"}, None, id="junk"),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ) == expected


def test_watchdog_interval_for_this_pid() -> None:
    environ = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(environ) == 0.5


# --- ssefan as systemd sees it -----------------------------------------------------------


def test_lifecycle_messages(upstream: FakeUpstream, tmp_path: Path) -> None:
    receiver = NotifyReceiver.bind(short_socket_path(tmp_path, "notify.sock"))
    config = write_config(tmp_path / "s.yaml", route_config(upstream))
    # 200 ms deadline: pings every 100 ms, so a few arrive within a second.
    env = {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000"}
    proc = SsefanProcess(config, env=env).start()
    try:
        ready = receiver.wait_for(lambda m: m.get("READY") == "1", "READY=1")
        # READY waits for the eager upstream to stream.
        assert upstream.requests
        assert "0 clients on 1 route; 1/1 upstreams streaming" in receiver.messages[ready]["STATUS"]
        first_ping = receiver.wait_for(lambda m: "WATCHDOG" in m, "a watchdog ping")
        later = receiver.wait_for(lambda m: "WATCHDOG" in m, "more pings", after=first_ping + 3)
        span = receiver.received_at[later] - receiver.received_at[first_ping]
        assert span < 2.0  # ~100 ms apart, not seconds

        signal_proc(proc, signal.SIGHUP)
        reloading = receiver.wait_for(lambda m: "RELOADING" in m, "RELOADING=1", after=ready + 1)
        assert receiver.messages[reloading]["MONOTONIC_USEC"].isdigit()
        receiver.wait_for(lambda m: m.get("READY") == "1", "READY=1 again", after=reloading)

        signal_proc(proc, signal.SIGTERM)
        receiver.wait_for(lambda m: "STOPPING" in m, "STOPPING=1", after=reloading)
        assert proc.proc is not None and proc.proc.wait(10) == 0
    finally:
        proc.stop()
        receiver.close()


def test_ready_after_ready_timeout_when_upstream_is_down(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    upstream.status = 503
    receiver = NotifyReceiver.bind(short_socket_path(tmp_path, "notify.sock"))
    config = route_config(upstream)
    config["ready_timeout"] = "300ms"
    proc = SsefanProcess(
        write_config(tmp_path / "s.yaml", config), env={"NOTIFY_SOCKET": receiver.address}
    ).start()
    try:
        index = receiver.wait_for(lambda m: m.get("READY") == "1", "READY=1 anyway")
        assert "0/1 upstreams streaming" in receiver.messages[index]["STATUS"]
        wait_log(proc, "not ready after 0.3s (/events upstream")
    finally:
        proc.stop()
        receiver.close()
