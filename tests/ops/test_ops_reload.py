"""SIGHUP reloads: valid, invalid and route-changing configs while clients
stay connected and keep receiving."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from raw_http import http_request
from sse_clients import SSEClient, StreamDecoder, pump_until, refusal_of
from sse_upstream import FakeUpstream
from ssefan_process import (
    SsefanProcess,
    multi_route_config,
    route_config,
    signal_proc,
    wait_log,
    write_config,
)
from waits import wait_until

from ssefan.config import AdminConfig, Config, ListenConfig, RouteConfig, UpstreamConfig
from ssefan.core.sse import Event
from ssefan.ops.reload import plan
from ssefan.stream.channel import Channel, DisconnectReason, Subscriber

# --- the plan, in memory --------------------------------------------------------------

UP = UpstreamConfig(url="http://127.0.0.1:8000/events")
LISTEN = ListenConfig(host="127.0.0.1", port=8080)


def config(*routes: RouteConfig, **top: object) -> Config:
    return Config(**{"listen": LISTEN, "routes": routes, **top})  # type: ignore[arg-type]


def route(path: str = "/events", **fields: object) -> RouteConfig:
    return RouteConfig(path=path, upstream=fields.pop("upstream", UP), **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(config(route()), config(route()), ([], [], set(), set()), id="same"),
        pytest.param(
            config(route()),
            config(route(heartbeat=1.0, max_clients=5, cors=None, retry=2000)),
            ([], [], set(), set()),
            id="in-place-settings",
        ),
        pytest.param(
            config(route("/a"), route("/b")),
            config(route("/b"), route("/c")),
            (["/c"], ["/a"], set(), set()),
            id="added-and-removed",
        ),
        pytest.param(
            config(route()),
            config(route(upstream=replace(UP, url="http://127.0.0.1:9000/events"))),
            ([], [], {"/events"}, set()),
            id="new-upstream-url",
        ),
        pytest.param(
            config(route()),
            config(route(upstream=replace(UP, headers=(("Authorization", "Bearer new"),)))),
            ([], [], {"/events"}, set()),
            id="rotated-token",
        ),
        pytest.param(
            config(route()),
            config(route(buffer=10)),
            ([], [], set(), {"/events"}),
            id="new-buffer",
        ),
    ],
)
def test_plan(
    old: Config, new: Config, expected: tuple[list[str], list[str], set[str], set[str]]
) -> None:
    change = plan(old, new)
    added, removed, new_upstream, new_buffer = expected
    assert [r.path for r in change.added] == added
    assert change.removed == removed
    assert change.new_upstream == new_upstream
    assert change.new_buffer == new_buffer
    assert [r.path for r in change.kept] == [r.path for r in new.routes if r.path not in added]
    assert change.needs_restart == []


def test_plan_names_what_needs_a_restart() -> None:
    admin = AdminConfig(listen=ListenConfig(host="127.0.0.1", port=9090))
    change = plan(
        config(route()),
        config(route(), listen=replace(LISTEN, port=8081), admin=admin, workers=2),
    )
    assert change.needs_restart == [
        "listen changed from 127.0.0.1:8080 to 127.0.0.1:8081:"
        " still listening on 127.0.0.1:8080 until a restart",
        "admin.listen changed from off to 127.0.0.1:9090: the admin endpoints stay off"
        " until a restart",
        "workers changed from 1 to 2: 1 keep running until a restart",
    ]


# --- the channel keeps its clients through a new ring -------------------------------------


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # no socket: an in-memory transport

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    abort = close


def decoded(transport: Transport) -> StreamDecoder:
    decoder = StreamDecoder(chunked=True)
    for data in transport.writes:
        decoder.feed(data)
    return decoder


def test_smaller_ring_keeps_live_and_lagging_clients(loop: asyncio.AbstractEventLoop) -> None:
    channel = Channel(route(buffer=10), loop=loop)
    channel.publish([Event(str(i), id=str(i)) for i in range(1, 6)])
    live_t, lagging_t = Transport(), Transport()
    live = Subscriber(cast(asyncio.WriteTransport, live_t), chunked=True)
    lagging = Subscriber(cast(asyncio.WriteTransport, lagging_t), chunked=True)
    channel.subscribe(live, None)
    channel.subscribe(lagging, "3")  # replays 4, 5
    channel.pause(lagging)  # its transport pushed back: it keeps a cursor only
    channel.publish([Event("6", id="6")])

    channel.reconfigure(route(buffer=3))  # holds 4, 5, 6 now: the cursor (at 6) is valid
    assert len(channel.ring) == 3 and channel.ring.oldest_id == "4"
    channel.resume(lagging)
    channel.publish([Event("7", id="7")])
    assert [e.id for e in decoded(live_t).events] == ["6", "7"]
    assert [e.id for e in decoded(lagging_t).events] == ["4", "5", "6", "7"]
    assert channel.client_count == 2


def test_ring_too_small_for_a_laggard_evicts_it(loop: asyncio.AbstractEventLoop) -> None:
    channel = Channel(route(buffer=10), loop=loop)
    channel.publish([Event(str(i), id=str(i)) for i in range(1, 6)])
    transport = Transport()
    lagging = Subscriber(cast(asyncio.WriteTransport, transport), chunked=True)
    channel.subscribe(lagging, "1")
    channel.pause(lagging)  # it was sent everything; its cursor is the head (seq 5)
    channel.publish([Event(str(i), id=str(i)) for i in range(6, 10)])  # it still needs 6..9
    channel.reconfigure(route(buffer=2))  # holds 8, 9 only
    assert lagging.closed and transport.closed
    assert channel.stats.disconnects[DisconnectReason.EVICTED] == 1


# --- a running ssefan ------------------------------------------------------------------


def start(tmp_path: Path, cfg: dict[str, object]) -> tuple[SsefanProcess, Path]:
    path = write_config(tmp_path / "ssefan.yaml", cfg)
    return SsefanProcess(path).start(), path


def reload(proc: SsefanProcess, path: Path, cfg: dict[str, object] | str, count: int) -> None:
    if isinstance(cfg, str):
        path.write_text(cfg)
    else:
        write_config(path, cfg)
    signal_proc(proc, signal.SIGHUP)
    wait_log(proc, "reload", count)


def test_valid_reload_keeps_clients_subscription_and_applies_settings(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    proc, path = start(tmp_path, route_config(upstream, heartbeat="15s"))
    try:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        upstream.publish("before", id="1")
        client.read_events(1)

        write_config(path, route_config(upstream, heartbeat="200ms", max_clients=1))
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded")
        assert "kept: /events" in proc.log_text()

        upstream.publish("after", id="2")
        assert [e.data for e in client.read_events(2)] == ["before", "after"]
        # The new heartbeat applies to the open stream...
        pump_until(client, lambda: "" in client.comments, what="a heartbeat comment")
        # ...and the new limit to new clients.
        refused = http_request(proc.host, proc.port, b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert refusal_of(refused)["reason"] == "max_clients"
        assert upstream.accepted == 1  # the same subscription all along
        client.close()
    finally:
        proc.stop()


def test_invalid_reload_logs_every_problem_and_keeps_running(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    proc, path = start(tmp_path, route_config(upstream))
    try:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        path.write_text(
            f"listen: 127.0.0.1:0\nroutes:\n  - path: /events\n    upstream: {upstream.url}\n"
            "    buffer: 0\n    hearbeat: 5s\n"
        )
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reload failed with 2 problem(s): still running the previous config")
        log = proc.log_text()
        assert "routes[0].buffer: expected an integer >= 1, got 0" in log
        assert 'routes[0].hearbeat: unknown key; did you mean \\"heartbeat\\"?' in log

        upstream.publish("still here", id="1")
        assert [e.data for e in client.read_events(1)] == ["still here"]
        assert upstream.accepted == 1
        client.close()
    finally:
        proc.stop()


def test_routes_added_removed_and_upstream_swapped(upstream: FakeUpstream, tmp_path: Path) -> None:
    other = FakeUpstream().start()
    try:
        proc, path = start(
            tmp_path, multi_route_config(upstream, [{"path": "/a"}, {"path": "/gone"}])
        )
        try:
            wait_until(lambda: upstream.active == 2, what="two subscriptions")
            a = SSEClient(proc.host, proc.port, "/a")
            gone = SSEClient(proc.host, proc.port, "/gone")
            upstream.publish("from the first app", id="x1")
            a.read_events(1)
            gone.read_events(1)

            new = multi_route_config(upstream, [{"path": "/a"}, {"path": "/new"}])
            new["routes"][0]["upstream"] = other.url  # type: ignore[index]
            write_config(path, new)
            signal_proc(proc, signal.SIGHUP)
            wait_log(proc, "reloaded")
            assert "added: /new; removed: /gone; new upstream: /a" in proc.log_text()

            gone.read_until_closed()  # its route is gone: its stream ended
            missing = http_request(proc.host, proc.port, b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
            assert missing.status == 404

            # /a's clients stayed; the new subscription resumed from the last id.
            other.wait_connected()
            assert other.requests[0].headers.get("last-event-id") == "x1"
            other.publish("from the second app", id="y1")
            assert [e.data for e in a.read_events(2)] == [
                "from the first app",
                "from the second app",
            ]
            assert not a.closed

            # /new subscribed to the first app (next to /gone's subscription, now closed).
            wait_until(lambda: upstream.active == 1, what="/a and /gone unsubscribed, /new on")
            fresh = SSEClient(proc.host, proc.port, "/new")
            upstream.publish("for /new", id="x2")
            assert [e.data for e in fresh.read_events(1)] == ["for /new"]
            for client in (a, gone, fresh):
                client.close()
        finally:
            proc.stop()
    finally:
        other.close()


def test_new_buffer_keeps_clients_and_replay(upstream: FakeUpstream, tmp_path: Path) -> None:
    proc, path = start(tmp_path, route_config(upstream, buffer=10))
    try:
        upstream.wait_connected()
        client = SSEClient(proc.host, proc.port)
        for i in range(1, 6):
            upstream.publish(f"e{i}", id=str(i))
        client.read_events(5)

        write_config(path, route_config(upstream, buffer=3))
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded")
        assert "new buffer: /events" in proc.log_text()

        upstream.publish("e6", id="6")
        assert client.read_events(6)[-1].data == "e6"
        resumed = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": "4"})
        assert [e.data for e in resumed.read_events(2)] == ["e5", "e6"]
        evicted = SSEClient(proc.host, proc.port, headers={"Last-Event-ID": "2"})
        assert evicted.read_events(1)[0].event == "ssefan-gap"  # 2 fell out of the smaller ring
        for c in (client, resumed, evicted):
            c.close()
    finally:
        proc.stop()


def test_listen_change_is_logged_and_needs_a_restart(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    proc, path = start(tmp_path, route_config(upstream))
    try:
        moved = route_config(upstream)
        moved["listen"] = "127.0.0.1:1"
        write_config(path, moved)
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "reloaded")
        assert (
            "reload: listen changed from 127.0.0.1:0 to 127.0.0.1:1:"
            " still listening on 127.0.0.1:0 until a restart"
        ) in proc.log_text()
        client = SSEClient(proc.host, proc.port)  # the old address still serves
        assert client.status == 200
        client.close()
    finally:
        proc.stop()
