"""TLS for clients over HTTP/1.1 (issue 14's first step), against real TLS on
loopback with certificates the test makes with `openssl`: httpx and raw
`ssl` clients get events, ALPN http/1.1 and no ALPN both work, min_version
refuses an older client, workers and socket activation serve TLS too, and
SIGHUP swaps the certificate without dropping a stream, or keeps the old
one when the new files are broken."""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import sys
from pathlib import Path

import httpx
import pytest
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import CommandProcess, SsefanProcess, signal_proc, wait_log, write_config
from tls_certs import Cert, make_cert, peer_fingerprint
from waits import DEFAULT_TIMEOUT

# What systemd does between fork and exec (as in test_ops_activation).
ACTIVATE = (
    "import os, sys\n"
    "os.dup2(int(sys.argv[1]), 3)\n"
    "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'ssefan', *sys.argv[2:]])\n"
)


def tls_config(upstream: FakeUpstream, cert: Cert, **top: object) -> dict[str, object]:
    tls: dict[str, object] = {"cert": str(cert.cert), "key": str(cert.key)}
    tls.update(top.pop("tls", {}))  # type: ignore[call-overload]
    return {
        "listen": {"address": "127.0.0.1:0", "tls": tls},
        **top,
        "routes": [{"path": "/events", "upstream": upstream.url, "heartbeat": "15s"}],
    }


def started(tmp_path: Path, config: dict[str, object]) -> SsefanProcess:
    return SsefanProcess(write_config(tmp_path / "tls.yaml", config)).start()


def handshake(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT)
    try:
        return context.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    return make_cert(tmp_path / "certs")


def test_httpx_stream_over_tls(upstream: FakeUpstream, cert: Cert, tmp_path: Path) -> None:
    proc = started(tmp_path, tls_config(upstream, cert))
    try:
        assert proc.url.startswith("https://127.0.0.1:")
        upstream.wait_connected()
        with (
            httpx.Client(verify=cert.client_context(), timeout=DEFAULT_TIMEOUT) as client,
            client.stream("GET", f"{proc.url}/events") as response,
        ):
            assert response.status_code == 200
            assert response.http_version == "HTTP/1.1"
            upstream.publish("over tls", id="1")
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:")) == "data: over tls"
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("offer", "selected"),
    [
        pytest.param(["http/1.1"], "http/1.1", id="alpn-http1.1"),
        pytest.param(None, None, id="no-alpn"),
    ],
)
def test_raw_tls_with_and_without_alpn(
    upstream: FakeUpstream,
    cert: Cert,
    tmp_path: Path,
    offer: list[str] | None,
    selected: str | None,
) -> None:
    proc = started(tmp_path, tls_config(upstream, cert))
    try:
        upstream.wait_connected()
        context = cert.client_context()
        if offer is not None:
            context.set_alpn_protocols(offer)
        client = SSEClient("127.0.0.1", proc.port, tls=context)
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.sock.selected_alpn_protocol() == selected
        assert client.status == 200
        upstream.publish("hello", id="1")
        assert [e.data for e in client.read_events(1)] == ["hello"]
        client.close()
    finally:
        proc.stop()


def test_min_version_1_3_refuses_a_tls_1_2_client(
    upstream: FakeUpstream, cert: Cert, tmp_path: Path
) -> None:
    proc = started(tmp_path, tls_config(upstream, cert, tls={"min_version": "1.3"}))
    try:
        old = cert.client_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(ssl.SSLError):
            handshake(proc.port, old).close()
        with handshake(proc.port, cert.client_context()) as sock:
            assert sock.version() == "TLSv1.3"
    finally:
        proc.stop()


def test_workers_serve_tls(upstream: FakeUpstream, cert: Cert, tmp_path: Path) -> None:
    proc = started(tmp_path, tls_config(upstream, cert, workers=2))
    try:
        assert proc.url.startswith("https://")
        upstream.wait_connected(2)
        clients = [SSEClient("127.0.0.1", proc.port, tls=cert.client_context()) for _ in range(4)]
        assert [c.status for c in clients] == [200] * 4
        upstream.publish("to every worker", id="1")
        for client in clients:
            assert [e.data for e in client.read_events(1)] == ["to every worker"]
            client.close()
    finally:
        proc.stop()


def test_socket_activation_serves_tls(upstream: FakeUpstream, cert: Cert, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    fd = listener.fileno()
    config = write_config(tmp_path / "tls.yaml", tls_config(upstream, cert))
    argv = [sys.executable, "-c", ACTIVATE, str(fd), "serve", "--config", str(config)]
    proc = CommandProcess(config, argv, pass_fds=(fd,))
    try:
        proc.start()
        assert proc.url == f"https://127.0.0.1:{listener.getsockname()[1]}"
        upstream.wait_connected()
        client = SSEClient("127.0.0.1", proc.port, tls=cert.client_context())
        assert client.status == 200
        upstream.publish("activated", id="1")
        assert [e.data for e in client.read_events(1)] == ["activated"]
        client.close()
    finally:
        proc.stop()
        listener.close()


def _trusting(*certs: Cert) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for each in certs:
        context.load_verify_locations(cafile=str(each.cert))
    return context


def test_sighup_swaps_the_certificate_and_keeps_streams(
    upstream: FakeUpstream, cert: Cert, tmp_path: Path
) -> None:
    new = make_cert(tmp_path / "new", "renewed")
    assert new.fingerprint != cert.fingerprint
    proc = started(tmp_path, tls_config(upstream, cert))
    try:
        upstream.wait_connected()
        context = _trusting(cert, new)
        with handshake(proc.port, context) as before:
            assert peer_fingerprint(before.getpeercert(binary_form=True)) == cert.fingerprint
        stream = SSEClient("127.0.0.1", proc.port, tls=context)
        assert stream.status == 200
        upstream.publish("one", id="1")
        stream.read_events(1)
        # Renewed in place, as certbot and friends do: the config is unchanged.
        shutil.copyfile(new.cert, cert.cert)
        shutil.copyfile(new.key, cert.key)
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "new TLS handshakes use")
        upstream.publish("two", id="2")
        assert [e.data for e in stream.read_events(2)] == ["one", "two"]
        with handshake(proc.port, context) as after:
            assert peer_fingerprint(after.getpeercert(binary_form=True)) == new.fingerprint
        assert stream.sock.fileno() != -1 and not stream.closed
        upstream.publish("three", id="3")
        assert [e.data for e in stream.read_events(3)][-1] == "three"
        stream.close()
    finally:
        proc.stop()


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param("cert", id="unparsable-cert"),
        pytest.param("key", id="key-of-another-cert"),
    ],
)
def test_sighup_with_a_broken_certificate_keeps_the_old_one(
    upstream: FakeUpstream, cert: Cert, tmp_path: Path, breakage: str
) -> None:
    proc = started(tmp_path, tls_config(upstream, cert))
    try:
        upstream.wait_connected()
        context, served = cert.client_context(), cert.fingerprint
        stream = SSEClient("127.0.0.1", proc.port, tls=context)
        assert stream.status == 200
        if breakage == "cert":
            cert.cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
            named = str(cert.cert)
        else:
            other = make_cert(tmp_path / "other", "other")
            shutil.copyfile(other.key, cert.key)
            named = "listen.tls.key: the key does not match listen.tls.cert"
        signal_proc(proc, signal.SIGHUP)
        wait_log(proc, "still running the previous config")
        assert named in proc.log_text()
        # A new handshake still gets the certificate that was serving.
        with handshake(proc.port, context) as sock:
            assert peer_fingerprint(sock.getpeercert(binary_form=True)) == served
        upstream.publish("still here", id="1")
        assert [e.data for e in stream.read_events(1)] == ["still here"]
        stream.close()
    finally:
        proc.stop()
