"""The admin listener: /healthz, /readyz, /metrics (read by Prometheus' own
parser, with values that match what the test did) and the live status page."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from opsharness import admin_url, get, maybe, scrape, value
from prometheus_client.parser import text_string_to_metric_families
from raw_http import http_request
from sse_clients import SSEClient, refusal_of
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, route_config, write_config
from waits import DEFAULT_TIMEOUT, wait_until

from ssefan.ops import metrics


def start(app: FakeUpstream, tmp_path: Path, **route: object) -> SsefanProcess:
    config = route_config(app)
    config["routes"][0].update(route)  # type: ignore[index]
    config["admin"] = {"listen": "127.0.0.1:0"}
    return SsefanProcess(write_config(tmp_path / "s.yaml", config)).start()


def test_metrics_match_what_happened(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = start(upstream, tmp_path, max_clients=3)
    try:
        admin = admin_url(proc)
        upstream.wait_connected()
        for i in (1, 2, 3):
            upstream.publish(f"e{i}", id=str(i))
        live = SSEClient(proc.host, proc.port)
        hit = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": "2"})  # replays 3
        miss = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": "nope"})  # gap, 1..3
        refused = http_request(proc.host, proc.port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refusal_of(refused)["reason"] == "max_clients"
        upstream.publish("e4", id="4")
        live.read_events(1)
        hit.read_events(2)
        miss.read_events(5)  # the gap event, then 1..4
        live.close()
        wait_until(
            lambda: (
                value(
                    scrape(admin),
                    "ssefan_disconnects_total",
                    route="/events",
                    reason="client_closed",
                )
                == 1
            ),
            what="the closed client counted",
        )

        m = scrape(admin)
        route = {"route": "/events"}
        assert value(m, "ssefan_clients", **route) == 2
        assert value(m, "ssefan_connects_total", **route) == 3
        assert value(m, "ssefan_events_received_total", **route) == 4
        assert value(m, "ssefan_events_delivered_total", **route) == 1 + 2 + 4
        assert value(m, "ssefan_replays_total", **route, result="hit") == 1
        assert value(m, "ssefan_replays_total", **route, result="miss") == 1
        assert value(m, "ssefan_replays_total", **route, result="gap") == 0
        assert value(m, "ssefan_disconnects_total", **route, reason="slow") == 0
        # answered 200 + a retry stream, so not counted as a 503
        assert maybe(m, "ssefan_refused_total", status="503") is None
        refusals = "ssefan_stream_refusals_total"
        assert value(m, refusals, **route, reason="max_clients") == 1
        assert value(m, refusals, **route, reason="shutting_down") == 0
        assert value(m, "ssefan_disconnects_total", **route, reason="limit") == 1
        assert value(m, "ssefan_ring_events", **route) == 4
        assert value(m, "ssefan_ring_bytes", **route) > 4 * len("data: e1\n\n")
        assert 0 <= value(m, "ssefan_upstream_last_event_age_seconds", **route) < DEFAULT_TIMEOUT
        assert 0 <= value(m, "ssefan_ring_oldest_age_seconds", **route) < DEFAULT_TIMEOUT
        assert value(m, "ssefan_upstream_state", **route, state="streaming") == 1
        assert value(m, "ssefan_upstream_state", **route, state="backoff") == 0
        assert value(m, "ssefan_upstream_connects_total", **route) == 1
        assert value(m, "ssefan_upstream_failures_total", **route) == 0
        assert value(m, "ssefan_ready") == 1
        assert value(m, "ssefan_bytes_out_total", **route) > 0
        for client in (hit, miss):
            client.close()
    finally:
        proc.stop()


def test_health_and_readiness(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.status = 500  # the app is down at first
    proc = start(
        upstream,
        tmp_path,
        upstream={"url": upstream.url, "backoff_base": "50ms", "backoff_max": "100ms"},
    )
    try:
        admin = admin_url(proc)
        assert get(admin + "/healthz")[::2] == (200, b"ok\n")
        status, _, body = get(admin + "/readyz")
        assert status == 503 and body.startswith(b"not ready: /events upstream ")
        assert value(scrape(admin), "ssefan_ready") == 0
        upstream.status = 200
        wait_until(lambda: get(admin + "/readyz")[0] == 200, what="ready once the app is up")
        assert value(scrape(admin), "ssefan_upstream_failures_total", route="/events") >= 1
        assert get(admin + "/nothing")[0] == 404
    finally:
        proc.stop()


def test_status_page_updates_over_sse(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = start(upstream, tmp_path)
    try:
        admin = admin_url(proc)
        status, content_type, page = get(admin + "/")
        assert status == 200 and content_type.startswith("text/html")
        assert b'new EventSource("status")' in page
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        host, port = admin.removeprefix("http://").rsplit(":", 1)
        status_stream = SSEClient(host, int(port), "/status")
        assert status_stream.headers["content-type"].startswith("text/event-stream")
        upstream.publish("one", id="1")
        # Updates keep coming (one a second): the second one carries a rate.
        events = status_stream.read_events(2, timeout=5)
        update = json.loads(events[1].data)
        [row] = update["routes"]
        assert row["route"] == "/events" and row["clients"] == 1
        assert row["upstream"] == ["streaming"] and "rate" in row
        assert update["clients"] == 1
        client.close()
        status_stream.close()
    finally:
        proc.stop()


def test_render_escapes_labels_and_help() -> None:
    family = metrics.Family("ssefan_x_total", "counter", 'help with \\ and\nnewline "q"')
    family.add({"route": '/a"b\\c\nd'}, 3)
    family.add({"route": "/plain"}, 0.25)
    gauge = metrics.Family("ssefan_y", "gauge", "a gauge")
    gauge.add({}, float("nan"))
    [parsed_x, parsed_y] = text_string_to_metric_families(metrics.render([family, gauge]).decode())
    assert parsed_x.type == "counter" and parsed_x.documentation == family.help
    assert [(s.labels["route"], s.value) for s in parsed_x.samples] == [
        ('/a"b\\c\nd', 3),
        ("/plain", 0.25),
    ]
    assert parsed_y.samples[0].value != parsed_y.samples[0].value  # NaN survives


def test_merge_labels_each_worker() -> None:
    one = metrics.Family("ssefan_clients", "gauge", "clients")
    one.add({"route": "/e"}, 2)
    two = metrics.Family("ssefan_clients", "gauge", "clients")
    two.add({"route": "/e"}, 5)
    families = metrics.from_json(metrics.to_json(metrics.merge([("0", [one]), ("1", [two])])))
    [merged] = families
    assert merged.samples == [
        ({"route": "/e", "worker": "0"}, 2),
        ({"route": "/e", "worker": "1"}, 5),
    ]
    assert metrics.status(families)["clients"] == 7


def test_admin_refuses_a_slow_or_huge_request(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc = start(upstream, tmp_path)
    try:
        host, port = admin_url(proc).removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=DEFAULT_TIMEOUT) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 20_000 + b"\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert b"200" not in data.split(b"\r\n", 1)[0]  # closed, not answered
    finally:
        proc.stop()


def test_pass_through_and_forward_auth_metrics(upstream: FakeUpstream, tmp_path: Path) -> None:
    from app_server import TestApp

    app = TestApp().start()
    try:
        app.auth_rules.update({"alice": 200, "mallory": 403})
        config = route_config(upstream, auth={"url": f"{app.url}/auth", "cache": "30s"})
        config["app"] = app.url
        config["admin"] = {"listen": "127.0.0.1:0"}
        proc = SsefanProcess(write_config(tmp_path / "s.yaml", config)).start()
        try:
            admin = admin_url(proc)
            for _ in range(2):  # passed through to the app
                echo = http_request(
                    proc.host,
                    proc.port,
                    b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                assert echo.status == 200
            streams = [
                SSEClient(proc.host, proc.port, headers={"Cookie": "session=alice"})
                for _ in range(2)  # one ask, then a cache hit
            ]
            assert [s.status for s in streams] == [200, 200]
            denied = http_request(
                proc.host,
                proc.port,
                b"GET /events HTTP/1.1\r\nHost: x\r\nCookie: session=mallory\r\n\r\n",
            )
            assert denied.status == 403
            samples = scrape(admin)  # parsed by prometheus_client
            assert value(samples, "ssefan_proxy_requests_total") == 2
            assert value(samples, "ssefan_proxy_retries_total") == 0
            assert value(samples, "ssefan_proxy_tunnels_total") == 0
            assert value(samples, "ssefan_proxy_clients_gone_total") == 0
            route = {"route": "/events"}
            assert value(samples, "ssefan_auth_requests_total", **route) == 2
            assert value(samples, "ssefan_auth_cache_hits_total", **route) == 1
            assert value(samples, "ssefan_auth_decisions_total", **route, result="admitted") == 1
            assert value(samples, "ssefan_auth_decisions_total", **route, result="denied") == 1
            assert value(samples, "ssefan_auth_decisions_total", **route, result="unavailable") == 0
            assert value(samples, "ssefan_auth_saturated_total", **route) == 0
            assert value(samples, "ssefan_auth_revoked_total", **route) == 0
            for stream in streams:
                stream.close()
        finally:
            proc.stop()
    finally:
        app.close()
