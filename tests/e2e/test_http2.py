"""HTTP/2 for clients (issue 14), against real TLS on loopback: httpx with
http2=True, Debian's curl, and a raw h2 client (tests/support/h2_client.py)
for what those hide (GOAWAY, END_STREAM, RST_STREAM).

One request path, two framings: a stream route over HTTP/2 is a stream of
DATA frames with the same headers, cursor and replay as over HTTP/1.1;
pass-through, forward-auth and the fallback go the same way too. Drain and
certificate reload behave as over HTTP/1.1, with GOAWAY added.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import h2.errors
import httpx
import pytest
from app_server import TestApp, pattern
from h2_client import H2Client, H2Response
from opsharness import admin_url, scrape, value
from sse_upstream import FakeUpstream
from ssefan_process import SsefanProcess, signal_proc, stop_clean, wait_log, write_config
from tls_certs import Cert, make_cert, peer_fingerprint
from waits import DEFAULT_TIMEOUT, wait_until

STREAMS = 50
HOP_BY_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"te"}
_unique = itertools.count()


def unique(what: str) -> str:
    return f"{what}-{next(_unique)}"


def h2_config(upstream: FakeUpstream, cert: Cert, **top: object) -> dict[str, object]:
    tls: dict[str, object] = {"cert": str(cert.cert), "key": str(cert.key)}
    tls.update(top.pop("tls", {}))  # type: ignore[call-overload]
    routes: list[dict[str, object]] = [{"path": "/events", "upstream": upstream.url}]
    routes += top.pop("routes", [])  # type: ignore[arg-type]
    return {
        "listen": {"address": "127.0.0.1:0", "tls": tls},
        "admin": {"listen": "127.0.0.1:0"},
        **top,
        "routes": routes,
    }


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return make_cert(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def ssefan(
    app: TestApp,
    stream_upstream: FakeUpstream,
    cert: Cert,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SsefanProcess]:
    auth = {"url": f"{app.url}/auth", "forward": ["cookie"]}
    config = h2_config(
        stream_upstream,
        cert,
        app=app.url,
        routes=[{"path": "/authed", "upstream": stream_upstream.url, "auth": auth}],
    )
    path = write_config(tmp_path_factory.mktemp("h2") / "ssefan.yaml", config)
    proc = SsefanProcess(path).start()
    try:
        stream_upstream.wait_connected(2)
        yield proc
    finally:
        stop_clean(proc)


def http2_events(proc: SsefanProcess, event: str) -> float:
    return value(scrape(admin_url(proc)), "ssefan_http2_events_total", event=event)


def wait_events(client: H2Client, responses: list[H2Response], data: list[str]) -> None:
    client.wait(
        lambda: all([e.data for e in r.events][-len(data) :] == data for r in responses),
        what=f"{data} on {len(responses)} streams",
    )


# --------------------------------------------------------------------------- streams


def test_httpx_50_streams_on_one_connection_and_resume_per_stream(
    ssefan: SsefanProcess, stream_upstream: FakeUpstream, cert: Cert
) -> None:
    ids = [unique("h2-id") for _ in range(3)]
    before = http2_events(ssefan, "connections")
    all_open = asyncio.Event()

    async def read(client: httpx.AsyncClient, opened: list[int], last_id: str | None) -> list[str]:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        async with client.stream("GET", f"{ssefan.url}/events", headers=headers) as response:
            assert response.http_version == "HTTP/2"
            assert response.headers["content-type"].startswith("text/event-stream")
            opened.append(response.status_code)
            if len(opened) == STREAMS:
                all_open.set()
            got: list[str] = []
            async for line in response.aiter_lines():
                if line.startswith("id:"):
                    got.append(line[3:].strip())
                    if got[-1] == ids[-1]:
                        return got
        raise AssertionError(f"the stream ended after {got}")

    async def fifty(last_id: str | None, publish: bool) -> list[list[str]]:
        async with httpx.AsyncClient(
            http2=True, verify=cert.client_context(), timeout=DEFAULT_TIMEOUT
        ) as client:
            opened: list[int] = []
            all_open.clear()
            tasks = [asyncio.create_task(read(client, opened, last_id)) for _ in range(STREAMS)]
            # Until all are open; a stream that fails meanwhile raises here.
            waiting = asyncio.create_task(all_open.wait())
            pending: set[asyncio.Task[object]] = {waiting, *tasks}
            while not all_open.is_set():
                done, pending = await asyncio.wait(
                    pending, timeout=DEFAULT_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
                )
                assert done, f"only {len(opened)} of {STREAMS} streams opened:\n" + "\n".join(
                    ssefan.lines[-20:]
                )
                for task in done - {waiting}:
                    task.result()
            assert opened == [200] * STREAMS
            if publish:
                for event_id in ids:
                    stream_upstream.publish(f"payload {event_id}", id=event_id)
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                return await asyncio.gather(*tasks)

    assert asyncio.run(fifty(None, publish=True)) == [ids] * STREAMS
    # Every stream resumes after the id it names, from the ring.
    assert asyncio.run(fifty(ids[0], publish=False)) == [ids[1:]] * STREAMS
    # httpx multiplexed each set of 50 onto one connection.
    assert http2_events(ssefan, "connections") - before == 2


def test_raw_h2_streams_get_the_stream_headers_and_no_hop_by_hop(
    ssefan: SsefanProcess, stream_upstream: FakeUpstream, cert: Cert
) -> None:
    client = H2Client(ssefan.port, cert.client_context())
    try:
        responses = [client.responses[client.request("/events")] for _ in range(3)]
        client.wait(lambda: all(r.headers for r in responses), what="three stream heads")
        head = responses[0].headers
        assert head[b":status"] == b"200"
        assert head[b"content-type"] == b"text/event-stream; charset=utf-8"
        assert head[b"cache-control"].startswith(b"no-cache")
        assert head[b"x-accel-buffering"] == b"no"
        assert not HOP_BY_HOP & set(head), head
        data = unique("raw")
        stream_upstream.publish(data, id=data)
        wait_events(client, responses, [data])
        # One reset stream leaves its neighbours streaming.
        client.reset(1)
        data = unique("after-reset")
        stream_upstream.publish(data, id=data)
        wait_events(client, responses[1:], [data])
    finally:
        client.close()


def test_curl_http2_sees_200_and_events(
    ssefan: SsefanProcess, stream_upstream: FakeUpstream, cert: Cert
) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is missing: .ci/run installs Debian's curl"
    command = [curl, "--http2", "-N", "-sS", "-i", "--cacert", str(cert.cert)]
    command += ["--max-time", str(DEFAULT_TIMEOUT), f"https://localhost:{ssefan.port}/events"]
    command += ["--resolve", f"localhost:{ssefan.port}:127.0.0.1"]
    lines: list[str] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or []), daemon=True)
        reader.start()
        try:
            wait_until(lambda: any(line.startswith(":") for line in lines), what="curl's stream")
            assert lines[0].strip() == "HTTP/2 200", lines
            data = unique("curl")
            stream_upstream.publish(data, id=data)
            wait_until(lambda: f"data: {data}\n" in lines, what=f"{data} through curl")
        finally:
            proc.terminate()
            proc.wait(DEFAULT_TIMEOUT)
            reader.join(DEFAULT_TIMEOUT)


# --------------------------------------------------------------------------- pass-through


def test_pass_through_bodies_both_ways(ssefan: SsefanProcess, app: TestApp, cert: Cert) -> None:
    client = H2Client(ssefan.port, cert.client_context())
    try:
        upload = pattern(300_000)
        sent = client.request(
            "/echo/upload",
            [("content-type", "application/octet-stream"), ("content-length", str(len(upload)))],
            method="POST",
            body=upload,
        )
        echoed = client.responses[sent]
        client.wait(lambda: echoed.done, what="the 300 KB upload's answer")
        assert echoed.status == 200, echoed.body[:200]
        seen = json.loads(bytes(echoed.body))
        assert seen["method"] == "POST" and seen["body_length"] == len(upload)
        assert seen["body_sha256"] == hashlib.sha256(upload).hexdigest()

        # A body without a length (HTTP/2 has no chunked): the app gets it chunked.
        unsized = client.request("/echo/unsized", method="POST", body_follows=True)
        pieces = [pattern(1000), pattern(70_000), b"end"]
        for piece in pieces:
            client.send_body(unsized, piece, end=False)
        client.send_body(unsized, b"", end=True)
        answer = client.responses[unsized]
        client.wait(lambda: answer.done, what="the unsized upload's answer")
        seen = json.loads(bytes(answer.body))
        assert seen["body_length"] == sum(map(len, pieces))
        assert seen["body_sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
        headers = {name.lower(): v for name, v in seen["headers"]}
        assert headers.get("transfer-encoding") == "chunked"

        download = client.get("/bytes?n=300000")
        assert download.status == 200 and bytes(download.body) == pattern(300_000)
        assert download.headers[b"content-length"] == b"300000"
    finally:
        client.close()


def test_pass_through_head_404_and_hop_by_hop(ssefan: SsefanProcess, cert: Cert) -> None:
    client = H2Client(ssefan.port, cert.client_context())
    try:
        head = client.responses[client.request("/echo/h", method="HEAD")]
        client.wait(lambda: head.done, what="HEAD's answer")
        assert head.status == 200 and head.body == b""
        assert client.get("/no-such-endpoint").status == 404
        hop = client.get("/hop")
        assert hop.status == 200 and bytes(hop.body) == b"hop\n"
        assert hop.headers[b"x-end-to-end"] == b"kept"
        named = {b"x-hop-secret", b"proxy-authenticate", b"trailer"}
        assert not (HOP_BY_HOP | named) & set(hop.headers), hop.headers
    finally:
        client.close()


def test_forward_auth_decides_each_stream_of_a_connection(
    ssefan: SsefanProcess, app: TestApp, stream_upstream: FakeUpstream, cert: Cert
) -> None:
    allowed, denied = unique("alice"), unique("mallory")
    app.auth_rules.update({allowed: 200, denied: 403})
    client = H2Client(ssefan.port, cert.client_context())
    try:
        yes = client.responses[client.request("/authed", [("cookie", f"session={allowed}")])]
        no = client.responses[client.request("/authed", [("cookie", f"session={denied}")])]
        anonymous = client.responses[client.request("/authed")]
        client.wait(lambda: bool(yes.headers and no.done and anonymous.done), what="3 decisions")
        assert (yes.status, no.status, anonymous.status) == (200, 403, 401)
        data = unique("authed")
        stream_upstream.publish(data, id=data)
        wait_events(client, [yes], [data])
        assert not yes.done
    finally:
        client.close()


# --------------------------------------------------------------------------- lifecycle


def started(tmp_path: Path, config: dict[str, object]) -> SsefanProcess:
    return SsefanProcess(write_config(tmp_path / "h2.yaml", config)).start()


def test_sigterm_drain_ends_streams_with_retry_and_goaway(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    cert = make_cert(tmp_path / "certs")
    proc = started(tmp_path, h2_config(upstream, cert, drain_window="2s"))
    try:
        upstream.wait_connected()
        client = H2Client(proc.port, cert.client_context())
        responses = [client.responses[client.request("/events")] for _ in range(3)]
        client.wait(lambda: all(r.headers for r in responses), what="three stream heads")
        signal_proc(proc, signal.SIGTERM)
        client.wait(lambda: all(r.ended for r in responses), what="END_STREAM on every stream")
        for response in responses:
            assert response.decoder.retry is not None and response.decoder.retry > 0
        assert client.goaway is not None
        assert client.goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        client.wait_closed()
        client.close()
        assert proc.proc is not None and proc.proc.wait(DEFAULT_TIMEOUT) == 0
    finally:
        proc.stop()


def test_sighup_swaps_the_certificate_under_h2_streams(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    cert = make_cert(tmp_path / "certs")
    renewed = make_cert(tmp_path / "new", "renewed")
    trusting = ssl.create_default_context(cafile=str(cert.cert))
    trusting.load_verify_locations(cafile=str(renewed.cert))
    proc = started(tmp_path, h2_config(upstream, cert))
    try:
        upstream.wait_connected()
        client = H2Client(proc.port, trusting)
        assert peer_fingerprint(client.sock.getpeercert(binary_form=True)) == cert.fingerprint
        responses = [client.responses[client.request("/events")] for _ in range(5)]
        client.wait(lambda: all(r.headers for r in responses), what="five stream heads")

        shutil.copyfile(renewed.cert, cert.cert)
        shutil.copyfile(renewed.key, cert.key)
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "new TLS handshakes use")
        upstream.publish("after renewal", id="1")
        wait_events(client, responses, ["after renewal"])
        fresh = H2Client(proc.port, trusting)
        assert peer_fingerprint(fresh.sock.getpeercert(binary_form=True)) == renewed.fingerprint
        fresh.close()

        # A broken certificate: refused, the renewed one keeps serving.
        cert.cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "still running the previous config")
        upstream.publish("after a broken one", id="2")
        wait_events(client, responses, ["after renewal", "after a broken one"])
        again = H2Client(proc.port, trusting)
        assert peer_fingerprint(again.sock.getpeercert(binary_form=True)) == renewed.fingerprint
        again.close()
        assert not any(r.done for r in responses) and client.goaway is None
        client.close()
    finally:
        proc.stop()


def test_alpn_http1_only_never_speaks_h2(upstream: FakeUpstream, tmp_path: Path) -> None:
    cert = make_cert(tmp_path / "certs")
    proc = started(tmp_path, h2_config(upstream, cert, tls={"alpn": ["http/1.1"]}))
    try:
        upstream.wait_connected()
        offering = cert.client_context()
        offering.set_alpn_protocols(["h2", "http/1.1"])
        raw = socket.create_connection(("127.0.0.1", proc.port), timeout=DEFAULT_TIMEOUT)
        with offering.wrap_socket(raw, server_hostname="localhost") as sock:
            assert sock.selected_alpn_protocol() == "http/1.1"
        context = cert.client_context()
        with (
            httpx.Client(http2=True, verify=context, timeout=DEFAULT_TIMEOUT) as client,
            client.stream("GET", f"{proc.url}/events") as response,
        ):
            assert response.http_version == "HTTP/1.1" and response.status_code == 200
            upstream.publish("over 1.1", id="1")
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:")) == "data: over 1.1"
    finally:
        proc.stop()
