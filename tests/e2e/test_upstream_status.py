"""Why a route's upstream is not streaming, as /readyz and the status page say
it: the failure's kind, its text, how many attempts in a row failed, the
(redacted) URL and when the next attempt is due. A real ssefan in front of a
real loopback app answering 500, 200 text/html, nothing at all (a closed
port), plain HTTP to an https:// URL, and a head followed by silence."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
from opsharness import admin_url, get
from sse_clients import SSEClient
from sse_upstream import FakeUpstream
from ssefan_process import multi_route_config, running_config
from waits import DEFAULT_TIMEOUT, wait_until

from ssefan.config import UpstreamConfig
from ssefan.stream.status import classify
from ssefan.stream.upstream import FailureKind, Upstream, UpstreamFailure, UpstreamState

# Short, fixed backoff: each wait is uniform in [0, 0.4 s], long enough for
# /readyz to be read in backoff, short enough for several failures per second.
BACKOFF = "400ms"
# A credential in the URL's query: it must show as *** everywhere.
SECRET = "s3cret-t0ken"
READY_REASON = re.compile(
    r"^not ready: /events upstream backoff \((?P<kind>[a-z_]+), (?P<count>\d+) failures?"
    r"(?: in a row)?\): (?P<text>.*), url (?P<url>\S+), next attempt in (?P<wait>[0-9.]+)s"
    r" \(at (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)\)$"
)


@dataclass
class Reason:
    kind: str
    count: int
    text: str
    url: str
    wait: float
    at: str


def closed_port() -> int:
    """A loopback port nothing listens on: bound, then closed."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def plain_http_server() -> Iterator[int]:
    """A loopback port that answers every connection in plain HTTP at once,
    before reading anything (so a TLS ClientHello gets HTTP bytes back)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopping = threading.Event()

    def serve() -> None:
        while not stopping.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stopping.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(DEFAULT_TIMEOUT)


@contextmanager
def serving(tmp_path: Path, app: FakeUpstream, url: str, **upstream: object) -> Iterator[str]:
    """ssefan with an admin listener and one eager route on `url`; yields the admin URL."""
    keys = {"url": url, "backoff_base": BACKOFF, "backoff_max": BACKOFF, **upstream}
    config = multi_route_config(
        app, [{"path": "/events", "upstream": keys}], admin={"listen": "127.0.0.1:0"}
    )
    with running_config(tmp_path, config) as proc:
        yield admin_url(proc)


def readyz(admin: str) -> tuple[int, str]:
    status, _, body = get(admin + "/readyz")
    return status, body.decode().rstrip("\n")


def wait_reason(admin: str, condition: Callable[[Reason], bool], what: str) -> Reason:
    """Read /readyz until it shows a backoff reason for which `condition` holds."""
    seen: list[str] = []
    found: list[Reason] = []

    def check() -> bool:
        status, text = readyz(admin)
        seen.append(text)
        match = READY_REASON.match(text)
        if status != 503 or match is None:
            return False
        reason = Reason(
            kind=match["kind"],
            count=int(match["count"]),
            text=match["text"],
            url=match["url"],
            wait=float(match["wait"]),
            at=match["at"],
        )
        found[:] = [reason]
        return condition(reason)

    try:
        wait_until(check, DEFAULT_TIMEOUT, what)
    except AssertionError as err:
        raise AssertionError(f"{err}; last /readyz answers: {seen[-3:]}") from None
    return found[0]


def status_row(admin: str, condition: Callable[[dict[str, object]], bool]) -> dict[str, object]:
    """Read the status page's live feed until the /events row satisfies `condition`."""
    host, port = admin.removeprefix("http://").rsplit(":", 1)
    stream = SSEClient(host, int(port), "/status")
    seen: list[object] = []
    try:
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while time.monotonic() < deadline:
            n = len(stream.events)
            event = stream.read_events(n + 1)[-1]
            snapshot = json.loads(event.data)
            (row,) = [r for r in snapshot["routes"] if r["route"] == "/events"]
            seen.append(row)
            if condition(row):
                row["not_ready"] = snapshot["not_ready"]
                row["time"] = snapshot["time"]
                return dict(row)
    finally:
        stream.close()
    raise AssertionError(f"no status row as expected; last rows: {seen[-3:]}")


def failing(kind: str, min_count: int) -> Callable[[dict[str, object]], bool]:
    def check(row: dict[str, object]) -> bool:
        failure = row.get("failure")
        return (
            isinstance(failure, dict)
            and failure["kind"] == kind
            and failure["count"] >= min_count
            and "backoff" in row["upstream"]  # type: ignore[operator]
            and failure["next_attempt"] is not None
        )

    return check


CASES = [
    pytest.param(
        {"status": 500},
        "status",
        "status 500 Internal Server Error (expected 200",
        id="status-500",
    ),
    pytest.param(
        {"content_type": "text/html"},
        "content_type",
        "content type 'text/html' (expected text/event-stream)",
        id="text-html",
    ),
]


@pytest.mark.parametrize(("knobs", "kind", "text"), CASES)
def test_an_answer_that_is_no_stream_shows_kind_text_count_and_next_attempt(
    upstream: FakeUpstream, tmp_path: Path, knobs: dict[str, object], kind: str, text: str
) -> None:
    good = {name: getattr(upstream, name) for name in knobs}
    for name, value in knobs.items():
        setattr(upstream, name, value)
    url = f"{upstream.url}?topic=news&access_token={SECRET}"
    with serving(tmp_path, upstream, url) as admin:
        reason = wait_reason(admin, lambda r: r.count >= 2, "two failures in a row")
        assert reason.kind == kind
        assert text in reason.text
        assert reason.url == f"{upstream.url}?topic=news&access_token=***"
        assert 0 <= reason.wait <= 0.4
        row = status_row(admin, failing(kind, 2))
        failure = row["failure"]
        assert isinstance(failure, dict)
        assert text in failure["text"]
        assert failure["url"] == reason.url == row["url"]
        # Rendered during the backoff: the next attempt is at most 0.4 s later.
        now = float(row["time"])  # type: ignore[arg-type]
        assert now - 0.05 <= float(failure["next_attempt"]) <= now + 0.45
        assert any("/events upstream backoff" in r for r in row["not_ready"])  # type: ignore[attr-defined]
        assert SECRET not in json.dumps(row)

        # The app recovers: ready, and the page keeps the last failure with count 0.
        for name, value in good.items():
            setattr(upstream, name, value)
        wait_until(lambda: readyz(admin) == (200, "ready"), DEFAULT_TIMEOUT, "ready")
        row = status_row(admin, lambda r: r["upstream"] == ["streaming"])
        failure = row["failure"]
        assert isinstance(failure, dict)
        assert (failure["kind"], failure["count"], failure["next_attempt"]) == (kind, 0, None)
        assert row["not_ready"] == []


def test_a_refused_connection_names_host_and_port(upstream: FakeUpstream, tmp_path: Path) -> None:
    port = closed_port()
    with serving(tmp_path, upstream, f"http://127.0.0.1:{port}/events") as admin:
        reason = wait_reason(admin, lambda r: r.count >= 3, "three refusals in a row")
        assert reason.kind == "refused"
        assert f"connection refused by 127.0.0.1:{port}" in reason.text
        assert "is the app running and listening there?" in reason.text
        row = status_row(admin, failing("refused", 3))
        assert row["url"] == f"http://127.0.0.1:{port}/events"


def test_plain_http_behind_an_https_url_is_a_tls_failure(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    with (
        plain_http_server() as port,
        serving(tmp_path, upstream, f"https://127.0.0.1:{port}/events") as admin,
    ):
        reason = wait_reason(admin, lambda r: r.count >= 2, "two TLS failures")
        assert reason.kind == "tls"
        assert f"TLS handshake with 127.0.0.1:{port} failed" in reason.text
        assert "does it speak TLS on that port (https://)?" in reason.text


def test_a_silent_stream_names_the_key_to_raise(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.stall = True  # a response head, then nothing
    with serving(tmp_path, upstream, upstream.url, idle_timeout="300ms") as admin:
        # Each attempt streams (which ends the run of failures) then goes quiet:
        # always 1 failure in a row, and a next attempt after the watchdog.
        reason = wait_reason(admin, lambda r: r.kind == "idle_timeout", "the watchdog")
        assert reason.count == 1
        assert "no bytes for 0.3s" in reason.text
        assert "routes[path=/events].upstream.idle_timeout = 0.3s" in reason.text
        assert "raise upstream.idle_timeout or have the app send comments" in reason.text
        row = status_row(admin, failing("idle_timeout", 1))
        assert "raise upstream.idle_timeout" in str(row["failure"])


def test_the_watchdog_log_line_says_what_to_do(upstream: FakeUpstream, tmp_path: Path) -> None:
    upstream.stall = True
    keys = {"url": upstream.url, "idle_timeout": "300ms", "backoff_base": BACKOFF}
    config = multi_route_config(upstream, [{"path": "/quiet", "upstream": keys}])
    with running_config(tmp_path, config) as proc:
        wait_until(lambda: "read-idle watchdog" in proc.log_text(), DEFAULT_TIMEOUT, "watchdog")
        line = next(ln for ln in proc.lines if "read-idle watchdog" in ln)
    assert "route=/quiet" in line
    assert "routes[path=/quiet].upstream.idle_timeout = 0.3s" in line
    assert "raise upstream.idle_timeout or have the app send comments" in line
    assert "kind=idle_timeout" in line


# --------------------------------------------------------------------------- in process


class _Sink:
    upstream_last_id = ""

    def publish(self, items: object) -> None:
        pass

    def upstream_connected(self) -> None:
        pass

    def upstream_disconnected(self) -> None:
        pass

    def upstream_stopped(self, status: int = 204) -> None:
        pass


def _upstream(url: str = "http://app.internal:8000/events") -> Upstream:
    return Upstream(UpstreamConfig(url=url), _Sink(), route="/events")


@pytest.mark.parametrize(
    ("exc", "kind", "text"),
    [
        pytest.param(ConnectionRefusedError(111, "refused"), "refused", "refused by", id="refused"),
        pytest.param(
            socket.gaierror(-2, "Name or service not known"),
            "dns",
            "'app.internal' does not resolve (Name or service not known)",
            id="dns",
        ),
        pytest.param(
            ssl.SSLCertVerificationError(1, "certificate verify failed"),
            "tls",
            "TLS certificate of app.internal:8000 not accepted",
            id="tls-cert",
        ),
        pytest.param(ssl.SSLError(1, "WRONG_VERSION_NUMBER"), "tls", "TLS handshake", id="tls"),
        pytest.param(ConnectionResetError(104, "reset"), "closed", "lost", id="reset"),
        pytest.param(TimeoutError(), "timeout", "timed out talking to", id="timeout"),
        pytest.param(h11.RemoteProtocolError("bad head"), "protocol", "malformed", id="protocol"),
        pytest.param(OSError(113, "No route to host"), "network", "No route", id="unreachable"),
        pytest.param(
            UpstreamFailure(FailureKind.STATUS, "status 502"), "status", "status 502", id="own"
        ),
    ],
)
def test_each_exception_has_a_kind_and_a_sentence(exc: Exception, kind: str, text: str) -> None:
    found_kind, found_text = classify(exc, _upstream().origin)
    assert found_kind.value == kind
    assert text in found_text


def test_the_record_counts_failures_in_a_row_and_dates_the_next_attempt() -> None:
    up = _upstream("http://app.internal:8000/events?api_key=k3y-s3cret")
    assert up.problem() == "idle, url http://app.internal:8000/events?api_key=***"
    up._failed(FailureKind.REFUSED, "connection refused by app.internal:8000")
    up._failed(FailureKind.REFUSED, "connection refused by app.internal:8000")
    before = time.monotonic()
    up._set_state(UpstreamState.BACKOFF, delay=2.0)
    failure = up.last_failure
    assert failure is not None and failure.count == 2
    assert failure.next_attempt is not None and failure.next_attempt >= before + 2.0
    assert failure.next_attempt_wall is not None and failure.next_attempt_wall > time.time()
    assert up.problem().startswith(
        "backoff (refused, 2 failures in a row): connection refused by app.internal:8000,"
        " url http://app.internal:8000/events?api_key=***, next attempt in "
    )
    up._set_state(UpstreamState.CONNECTING)
    assert up.problem().endswith(", attempt 3 under way")
    up._set_state(UpstreamState.STREAMING)
    failure = up.last_failure
    assert failure is not None
    assert (failure.count, failure.next_attempt, failure.kind) == (0, None, FailureKind.REFUSED)
    assert up.last_error == "connection refused by app.internal:8000"
    up._failed(FailureKind.IDLE_TIMEOUT, "quiet")
    assert up.last_failure is not None and up.last_failure.count == 1  # a new run
