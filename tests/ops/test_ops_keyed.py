"""Template routes (issue 12) in operation: metrics per template, never per key,
and a SIGHUP reload that keeps the clients of the keys it did not change."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from keyed_app import ROUTE, KeyedApp, keyed_config, progress, template_route
from opsharness import Samples, admin_url, maybe, scrape, value
from raw_http import http_request
from sse_clients import SSEClient
from ssefan_process import SsefanProcess, signal_proc, wait_log, write_config
from waits import wait_until


@pytest.fixture
def keyed_app() -> Iterator[KeyedApp]:
    app = KeyedApp().start()
    try:
        yield app
    finally:
        app.close()


def stream(proc: SsefanProcess, key: str, **headers: str) -> SSEClient:
    client = SSEClient(proc.host, proc.port, progress(key), headers=headers)
    assert client.status == 200, (client.status, client.headers)
    assert "content-length" not in client.headers, f"a refusal, not a stream: {client.headers}"
    return client


def assert_no_key_in_labels(samples: Samples, keys: list[str]) -> None:
    """Cardinality: a label names the template, never a concrete key or its path."""
    for name, labels in samples:
        for label, text in labels:
            assert not any(key in text for key in keys), (name, label, text)
            assert "/jobs/" not in text or text == ROUTE, (name, label, text)


def test_metrics_count_per_template_sum_over_keys_and_never_name_a_key(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    config = keyed_config(
        template_route(keyed_app, linger="500ms"), admin={"listen": "127.0.0.1:0"}
    )
    proc = SsefanProcess(write_config(tmp_path / "s.yaml", config))
    keys = ["metric-key-1", "metric-key-2", "metric-key-3"]
    clients: dict[str, list[SSEClient]] = {}
    try:
        proc.start()
        admin = admin_url(proc)
        clients = {key: [stream(proc, key)] for key in keys}
        clients[keys[0]].append(stream(proc, keys[0]))  # two clients on the first key
        for key in keys:
            keyed_app.wait_connections(key)
            keyed_app.publish(key, f"hello {key}")
        for client in (c for cs in clients.values() for c in cs):
            client.read_events(1)

        route = {"route": ROUTE}
        m = scrape(admin)
        assert value(m, "ssefan_channels", **route) == 3
        assert value(m, "ssefan_channels_opened_total", **route) == 3
        assert (maybe(m, "ssefan_channels_closed_total", **route, reason="linger") or 0) == 0
        # The route's counters are sums over its keys.
        assert value(m, "ssefan_clients", **route) == 4
        assert value(m, "ssefan_connects_total", **route) == 4
        assert value(m, "ssefan_events_received_total", **route) == 3
        assert value(m, "ssefan_events_delivered_total", **route) == 4
        assert value(m, "ssefan_upstream_connects_total", **route) == 3
        assert_no_key_in_labels(m, keys)

        # The last key's only client leaves: after the linger its channel closes.
        clients[keys[2]].pop().close()
        keyed_app.wait_closed(keys[2])
        wait_until(
            lambda: (
                maybe(scrape(admin), "ssefan_channels_closed_total", **route, reason="linger") == 1
            ),
            what="the lingered-out channel counted",
        )
        m = scrape(admin)
        assert value(m, "ssefan_channels", **route) == 2
        assert value(m, "ssefan_channels_opened_total", **route) == 3
        assert value(m, "ssefan_clients", **route) == 3
        assert_no_key_in_labels(m, keys)
    finally:
        for client in (c for cs in clients.values() for c in cs):
            client.close()
        proc.stop()


def test_reload_with_a_new_buffer_keeps_every_keys_clients(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    path = write_config(tmp_path / "s.yaml", keyed_config(template_route(keyed_app, buffer=100)))
    proc = SsefanProcess(path)
    keys = ["r1", "r2"]
    clients: list[SSEClient] = []
    try:
        proc.start()
        clients = [stream(proc, key) for key in keys]
        for key in keys:
            keyed_app.wait_connections(key)
            keyed_app.publish(key, f"{key} before")
        for client in clients:
            client.read_events(1)

        write_config(path, keyed_config(template_route(keyed_app, buffer=50)))
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded")

        for key in keys:
            keyed_app.publish(key, f"{key} after")
        for key, client in zip(keys, clients, strict=True):
            assert [e.data for e in client.read_events(2)] == [f"{key} before", f"{key} after"]
            assert not client.closed
            # The same upstream subscription all along: the upstream URL did not change.
            assert [c.closed_at for c in keyed_app.connections(key)] == [None]
        # The kept ring still replays, and a new key opens under the new settings.
        resumed = stream(proc, "r1", **{"Last-Event-ID": "1"})
        clients.append(resumed)
        assert [e.data for e in resumed.read_events(1)] == ["r1 after"]
        clients.append(stream(proc, "r3"))
        keyed_app.wait_connections("r3")
        keyed_app.publish("r3", "new key")
        assert [e.data for e in clients[-1].read_events(1)] == ["new key"]
    finally:
        for client in clients:
            client.close()
        proc.stop()


def test_a_head_request_gets_the_streams_head_and_makes_no_channel(
    keyed_app: KeyedApp, tmp_path: Path
) -> None:
    config = keyed_config(template_route(keyed_app, linger="60s"), admin={"listen": "127.0.0.1:0"})
    proc = SsefanProcess(write_config(tmp_path / "s.yaml", config))
    try:
        proc.start()
        admin = admin_url(proc)
        head = f"HEAD {progress('peek')} HTTP/1.1\r\nHost: {proc.host}:{proc.port}\r\n"
        answer = http_request(proc.host, proc.port, (head + "Connection: close\r\n\r\n").encode())
        assert answer.status == 200 and answer.body == b""
        assert answer.headers["content-type"].startswith("text/event-stream")
        route = {"route": ROUTE}
        # No channel: one made for a HEAD would have no client to free it ever.
        assert value(scrape(admin), "ssefan_channels", **route) == 0
        assert value(scrape(admin), "ssefan_channels_opened_total", **route) == 0
        client = stream(proc, "peek")
        keyed_app.wait_connections("peek")
        assert value(scrape(admin), "ssefan_channels_opened_total", **route) == 1
        client.close()
    finally:
        proc.stop()
