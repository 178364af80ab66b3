"""workers: N: processes on one port (SO_REUSEPORT), each with its own
subscription, restarted by the supervisor when they die."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from opsharness import Samples, admin_url, maybe, scrape, value
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import (
    SsefanProcess,
    activated,
    multi_route_config,
    route_config,
    signal_proc,
    wait_log,
    write_config,
)
from waits import wait_until


def worker_pids(samples: Samples) -> dict[str, int]:
    return {
        dict(labels)["worker"]: int(dict(labels)["pid"])
        for (name, labels), _ in samples.items()
        if name == "ssefan_worker_info"
    }


def clients_per_worker(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["worker"]: count
        for (name, labels), count in samples.items()
        if name == "ssefan_clients"
    }


def test_two_workers_serve_and_survive_a_kill(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = {**route_config(upstream), "workers": 2, "admin": {"listen": "127.0.0.1:0"}}
    proc = SsefanProcess(write_config(tmp_path / "s.yaml", config)).start()
    clients: list[SSEClient] = []
    try:
        admin = admin_url(proc)
        assert proc.log_text().count("listening on http://") == 1  # once, with the real port
        wait_until(lambda: upstream.active == 2, what="one subscription per worker")

        clients += [SSEClient(proc.host, proc.port) for _ in range(24)]
        samples = scrape(admin)
        per_worker = clients_per_worker(samples)
        assert sum(per_worker.values()) == 24
        assert set(per_worker) == {"0", "1"} and min(per_worker.values()) > 0, per_worker
        pids = worker_pids(samples)
        assert len(set(pids.values())) == 2 and proc.proc is not None
        assert proc.proc.pid not in pids.values()
        upstream.publish("to everyone", id="1")
        for client in clients:
            assert client.read_events(1)[0].data == "to everyone"

        os.kill(pids["0"], signal.SIGKILL)
        wait_until(
            lambda: worker_pids(scrape(admin)).get("0", pids["0"]) != pids["0"],
            what="worker 0 restarted",
        )
        wait_log(proc, f"worker 0 (pid {pids['0']}) exited with signal SIGKILL")
        wait_until(
            lambda: maybe(scrape(admin), "ssefan_ready", worker="0") == 1, what="worker 0 ready"
        )
        wait_until(lambda: upstream.active == 2, what="the new worker subscribed")
        assert value(scrape(admin), "ssefan_worker_restarts_total", worker="0") == 1

        upstream.publish("after the kill", id="2")
        survivors = 0
        for client in clients:
            client.sock.settimeout(5)
            try:
                client.read_events(2)
                survivors += 1
            except (AssertionError, ConnectionError):
                pass  # its worker was killed: it would reconnect now
        assert survivors == per_worker["1"]

        fresh = [SSEClient(proc.host, proc.port) for _ in range(8)]
        clients += fresh
        upstream.publish("for newcomers", id="3")
        for client in fresh:
            assert client.read_events(1)[0].data == "for newcomers"
    finally:
        for client in clients:
            client.close()
        assert proc.stop() == 0


def test_workers_reload_and_drain(upstream: FakeUpstream, tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "s.yaml", {**multi_route_config(upstream, [{"path": "/a"}]), "workers": 2}
    )
    proc = SsefanProcess(path).start()
    try:
        wait_until(lambda: upstream.active == 2, what="two subscriptions")
        client = SSEClient(proc.host, proc.port, "/a")

        path.write_text(path.read_text() + "bogus: 1\n")
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reload failed with 1 problem(s): every worker keeps the previous config")
        assert proc.log_text().count("bogus: unknown key") == 1  # said once, by the supervisor

        write_config(
            path,
            {**multi_route_config(upstream, [{"path": "/a"}, {"path": "/b"}]), "workers": 2},
        )
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded", count=2)  # each worker
        assert proc.log_text().count("added: /b; kept: /a") == 2
        upstream.publish("still streaming", id="1")
        assert client.read_events(1)[0].data == "still streaming"
        new_route = SSEClient(proc.host, proc.port, "/b")
        assert new_route.status == 200
        new_route.close()

        signal_proc(proc, signal.SIGTERM)
        client.read_until_closed()
        assert client.retry is not None  # drained by its worker, with a retry hint
        assert proc.proc is not None and proc.proc.wait(10) == 0
        assert proc.log_text().count("ssefan stopped") == 3  # two workers, one supervisor
        client.close()
    finally:
        proc.stop()


def test_workers_share_a_socket_from_systemd(upstream: FakeUpstream, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    path = write_config(tmp_path / "s.yaml", {**route_config(upstream), "workers": 2})
    proc = activated(path, listener)
    try:
        assert proc.port == listener.getsockname()[1]
        wait_until(lambda: upstream.active == 2, what="one subscription per worker")
        clients = [SSEClient(proc.host, proc.port) for _ in range(6)]
        upstream.publish("shared", id="1")
        for client in clients:
            assert client.read_events(1)[0].data == "shared"
            client.close()
    finally:
        proc.stop()
        listener.close()
