"""A headless Chromium driven over the DevTools protocol, and the page it runs.

* `Chromium`: Debian's `chromium` as a subprocess on a fresh profile, with the
  flags that keep it quiet (no background networking, updates or sync: without
  them it opens connections of its own), its DevTools port read from the
  `DevToolsActivePort` file it writes into the profile.
* `Page`: one tab over CDP (a WebSocket; `websockets`' sync client). The test
  reads what the page recorded with `Runtime.evaluate`; `Network` events are
  kept too, so a failure can show each stream response's status and whether it
  came on a reused keep-alive connection.
* `PageApp`: a loopback HTTP/1.1 app (stdlib `http.server`, keep-alive) that
  serves the test page, `/ping` for the page's fetch() loop and `/auth` for
  forward-auth (admits everyone). ssefan passes it through (`app:`), so the page,
  its fetch()es and its EventSources share one origin and one connection pool,
  as they do in production.

The page (`/page?streams=N&path=/events&fetch_ms=100`) opens N EventSources on
`path` and records, for each, every event id, every `open` and `error` with the
readyState at that moment, and the `ssefan-retry` / `ssefan-gap` events.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import pytest
from harness import DEFAULT_TIMEOUT, wait_until
from websockets.sync.client import ClientConnection, connect

CHROMIUM = "chromium"  # Debian's package and binary name


def chromium_binary() -> str:
    """The Chromium to drive; skips the test without one, fails it under CI.

    Under CI (`CI=true`) the browser tests must run: .ci/run installs the
    Debian package, so a missing binary is a broken set-up, not a skip.
    """
    binary = shutil.which(CHROMIUM)
    if binary is None:
        reason = f"no `{CHROMIUM}` on PATH (Debian package chromium; .ci/run installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: under CI the browser tests must run")
        pytest.skip(reason)
    return binary


# Headless, as root in a container, and with nothing that talks to the network
# by itself (component updates, sync, safe-browsing lists, QUIC probes).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-port=0",
)

# EventSource.readyState (WHATWG HTML §9.2.1).
CONNECTING, OPEN, CLOSED = 0, 1, 2


class CDPError(Exception):
    pass


class Chromium:
    """`chromium --headless` on a temporary profile; `close()` ends it and removes it."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.profile = Path(tempfile.mkdtemp(prefix="ssefan-chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.browser_path = ""
        self._log = self.profile.parent / f"{self.profile.name}.log"

    def start(self, timeout: float = 30.0) -> Chromium:
        active = self.profile / "DevToolsActivePort"
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its helper processes go with it (killpg)
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"chromium exited ({self.proc.returncode}):\n{self.log()}")
            # It writes "port\n/devtools/browser/<id>"; wait for both lines.
            lines = active.read_text().splitlines() if active.exists() else []
            if len(lines) < 2:
                return False
            self.port, self.browser_path = int(lines[0]), lines[1]
            return True

        wait_until(ready, timeout, "chromium's DevToolsActivePort")
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self._log.read_text(errors="replace")[-4000:]
        return ""

    def new_page(self) -> Page:
        """A fresh tab on about:blank."""
        with BrowserSession(f"ws://127.0.0.1:{self.port}{self.browser_path}") as browser:
            target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        return Page(f"ws://127.0.0.1:{self.port}/devtools/page/{target}", self, target)

    def close_target(self, target: str) -> None:
        with BrowserSession(f"ws://127.0.0.1:{self.port}{self.browser_path}") as browser:
            browser.call("Target.closeTarget", {"targetId": target})

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(DEFAULT_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(DEFAULT_TIMEOUT)
        shutil.rmtree(self.profile, ignore_errors=True)
        with contextlib.suppress(OSError):
            self._log.unlink()


class BrowserSession:
    """One CDP WebSocket: numbered calls, events kept for the caller."""

    def __init__(self, url: str) -> None:
        # As a context manager (websockets >= 17.1 warns about a bare connect()).
        # max_queue=None: a tab sends Network events all along; a bounded queue
        # would stop reading them, and the closing handshake would then wait
        # behind them until close_timeout.
        self._stack = contextlib.ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect(url, max_size=None, max_queue=None, open_timeout=DEFAULT_TIMEOUT)
        )
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    def __enter__(self) -> BrowserSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, method: str, params: dict[str, Any] | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> dict[str, Any]:
        call_id = next(self._ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CDPError(f"no answer to {method} within {timeout}s")
            try:
                message = json.loads(self.ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if message.get("id") == call_id:
                if "error" in message:
                    raise CDPError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result
            if "method" in message:
                self.events.append(message)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()


@dataclass
class StreamResponse:
    """A response Chromium got for an EventSource request (Network.responseReceived)."""

    url: str
    status: int
    mime_type: str
    connection_reused: bool


class Page(BrowserSession):
    """One tab: navigate, evaluate, and read the page's record."""

    def __init__(self, url: str, browser: Chromium, target: str) -> None:
        super().__init__(url)
        self.browser = browser
        self.target = target
        self.call("Runtime.enable")
        self.call("Network.enable")

    def evaluate(self, expression: str) -> Any:
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Load `url` and wait until its script has set up the record."""
        self.call("Page.navigate", {"url": url})
        wait_until(
            lambda: bool(self.evaluate("typeof window.rec === 'object'")),
            timeout,
            f"the page at {url} to load",
        )

    def record(self) -> PageRecord:
        return PageRecord.of(self.evaluate("snapshot()"))

    def wait_record(
        self, condition: Callable[[PageRecord], bool], timeout: float, what: str
    ) -> PageRecord:
        """Poll the page's record until `condition` holds; fail with the record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.record()
            if condition(record):
                return record
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {what}:\n{record.describe()}\n"
                    f"stream responses: {self.stream_responses()}"
                )
            time.sleep(0.05)

    def stream_responses(self) -> list[StreamResponse]:
        """What Chromium got for each EventSource request so far."""
        out = []
        for event in self.events:
            if event.get("method") != "Network.responseReceived":
                continue
            params = event["params"]
            if params.get("type") != "EventSource":
                continue
            response = params["response"]
            out.append(
                StreamResponse(
                    url=urlsplit(response["url"]).path,
                    status=int(response["status"]),
                    mime_type=response.get("mimeType", ""),
                    connection_reused=bool(response.get("connectionReused")),
                )
            )
        return out

    def close(self) -> None:
        super().close()
        with contextlib.suppress(Exception):
            self.browser.close_target(self.target)


@dataclass
class StreamRecord:
    path: str
    ready_state: int
    ids: list[str]
    opens: int
    errors: list[tuple[float, int]]  # (ms since page start, readyState at the error)
    refusals: list[str]  # the reasons of the ssefan-retry events it got
    gaps: int
    closed_by_test: bool

    @property
    def ever_closed(self) -> bool:
        """CLOSED by the browser (a failed connection), not by the page's own close()."""
        return any(state == CLOSED for _, state in self.errors)


@dataclass
class PageRecord:
    streams: list[StreamRecord]
    fetches_ok: int
    fetch_failures: int
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def of(cls, raw: Any) -> PageRecord:
        data = json.loads(raw)
        streams = [
            StreamRecord(
                path=s["path"],
                ready_state=s["readyState"],
                ids=s["ids"],
                opens=s["opens"],
                errors=[(t, state) for t, state in s["errors"]],
                refusals=s["refusals"],
                gaps=s["gaps"],
                closed_by_test=s["closedByTest"],
            )
            for s in data["streams"]
        ]
        return cls(streams, data["fetchesOk"], data["fetchFailures"], data)

    def describe(self) -> str:
        lines = [f"fetch ok={self.fetches_ok} failed={self.fetch_failures}"]
        for i, s in enumerate(self.streams):
            lines.append(
                f"stream {i} {s.path}: readyState={s.ready_state} opens={s.opens}"
                f" errors={s.errors[-6:]} refusals={s.refusals} gaps={s.gaps}"
                f" ids={len(s.ids)} (last {s.ids[-3:]}) closed_by_test={s.closed_by_test}"
            )
        return "\n".join(lines)


PAGE = """<!doctype html>
<meta charset="utf-8">
<title>ssefan EventSource test</title>
<script>
"use strict";
const query = new URLSearchParams(location.search);
const rec = {streams: [], fetchesOk: 0, fetchFailures: 0};
const sources = [];
const now = () => Math.round(performance.now());

function openStream(path) {
  const s = {path, ids: [], opens: 0, errors: [], refusals: [], gaps: 0, closedByTest: false};
  const es = new EventSource(path);
  es.onopen = () => { s.opens += 1; };
  // readyState at the error: CONNECTING (0) means the browser will retry,
  // CLOSED (2) that it failed the connection for good (WHATWG HTML 9.2.2).
  es.onerror = () => { s.errors.push([now(), es.readyState]); };
  es.onmessage = (e) => { s.ids.push(e.lastEventId); };
  es.addEventListener("ssefan-retry", (e) => { s.refusals.push(JSON.parse(e.data).reason); });
  es.addEventListener("ssefan-gap", () => { s.gaps += 1; });
  rec.streams.push(s);
  sources.push(es);
}

function closeStream(i) {
  rec.streams[i].closedByTest = true;
  sources[i].close();
}

function snapshot() {
  rec.streams.forEach((s, i) => { s.readyState = sources[i].readyState; });
  return JSON.stringify(rec);
}

// Same-origin requests between the streams' reconnects, so Chromium reuses
// the keep-alive connections they leave in its pool for the next EventSource.
async function fetchLoop(ms) {
  for (;;) {
    try {
      const r = await fetch("/ping", {cache: "no-store"});
      await r.text();
      if (r.ok) { rec.fetchesOk += 1; } else { rec.fetchFailures += 1; }
    } catch (e) {
      rec.fetchFailures += 1;
    }
    await new Promise((done) => setTimeout(done, ms));
  }
}

const path = query.get("path") || "/events";
for (let i = 0; i < Number(query.get("streams") || 1); i++) { openStream(path); }
if (query.get("fetch_ms")) { fetchLoop(Number(query.get("fetch_ms"))); }
window.rec = rec;
</script>
"""


class PageApp:
    """The app behind ssefan's pass-through: the page, /ping and /auth.

    `port` 0 binds any free port; a fixed one brings an app back where it was
    (an auth service that restarts).
    """

    def __init__(self, port: int = 0) -> None:
        self.pings = 0
        self.auth_calls = 0
        app = self

        class Handler(_PageHandler):
            owner: ClassVar[PageApp] = app

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> PageApp:
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()
        self._thread.join(DEFAULT_TIMEOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    owner: ClassVar[PageApp]
    protocol_version = "HTTP/1.1"  # keep-alive, as real apps answer

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: a test's output is its assertion

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/page":
            self._answer(200, "text/html; charset=utf-8", PAGE.encode())
        elif path == "/ping":
            self.owner.pings += 1
            self._answer(200, "text/plain", b"pong\n")
        elif path == "/auth":
            self.owner.auth_calls += 1
            self._answer(200, "text/plain", b"ok\n")
        else:
            self._answer(404, "text/plain", b"not here\n")

    def _answer(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.send_header("cache-control", "no-store")
        self.end_headers()
        self.wfile.write(body)
