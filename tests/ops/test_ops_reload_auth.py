"""SIGHUP reloads that change forward-auth: streams admitted under other rules
(or none) reconnect through the new ones; routes whose auth did not change
keep their decisions and their revalidation."""

from __future__ import annotations

import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_server import TestApp
from raw_http import http_request
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import (
    SsefanProcess,
    multi_route_config,
    signal_proc,
    stop_clean,
    wait_log,
    write_config,
)

from ssefan.ops.app import AUTH_RELOAD_WINDOW
from ssefan.ops.drain import DRAIN_RETRY_MS


@pytest.fixture
def app() -> Iterator[TestApp]:
    server = TestApp().start()
    try:
        yield server
    finally:
        server.close()


def test_reload_that_changes_auth_ends_those_streams_and_keeps_the_others(
    upstream: FakeUpstream, app: TestApp, tmp_path: Path
) -> None:
    user = f"user-{secrets.token_hex(4)}"
    app.auth_rules[user] = 200
    cookie = {"Cookie": f"session={user}"}
    auth = {"url": f"{app.url}/auth", "cache": "30s"}
    routes: list[dict[str, object]] = [
        {"path": "/open"},
        {"path": "/changed", "auth": auth},
        # A `retry:` outside the drain's range, so its last one tells who ended it.
        {"path": "/kept", "auth": {**auth, "revalidate": "200ms"}, "retry": "9s"},
    ]
    path = write_config(tmp_path / "ssefan.yaml", multi_route_config(upstream, routes))
    proc = SsefanProcess(path).start()
    try:
        open_ = SSEClient(proc.host, proc.port, "/open")
        changed = SSEClient(proc.host, proc.port, "/changed", headers=cookie)
        kept = SSEClient(proc.host, proc.port, "/kept", headers=cookie)
        clients = [open_, changed, kept]
        assert [c.status for c in clients] == [200] * 3
        upstream.wait_connected(3)
        upstream.publish("before", id="1")
        for client in clients:
            client.read_events(1)

        # /open gains auth, /changed's settings change, /kept's stay as they are.
        routes[0]["auth"] = auth
        routes[1]["auth"] = {**auth, "cache": "10s"}
        write_config(path, multi_route_config(upstream, routes))
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded")

        # Both ended within the window, each told to wait a jittered while first.
        for client in (open_, changed):
            client.read_until_closed(timeout=AUTH_RELOAD_WINDOW + 5)
            assert client.retry is not None
            assert DRAIN_RETRY_MS[0] <= client.retry <= DRAIN_RETRY_MS[1]
        # /open asks now: no cookie, no stream.
        refused = http_request(proc.host, proc.port, b"GET /open HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refused.status == 401

        # /kept's stream stayed, and its ForwardAuth (with its watches) too:
        # revalidation still ends it once the user is refused.
        upstream.publish("after", id="2")
        assert [e.data for e in kept.read_events(2)] == ["before", "after"]
        app.auth_rules[user] = 403
        kept.read_until_closed()
        assert kept.retry == 9000  # revoked by revalidation, not by the reload
        for client in clients:
            client.close()
    finally:
        stop_clean(proc)
