"""The page the browser tests open, what it records, and the app that serves it.

Kept apart from the Chromium driver (`browser`): this is the test's side of the
page, readable without knowing CDP.

* `PAGE` (`/page?streams=N&path=/events&fetch_ms=100`) opens N EventSources on
  `path` and records, for each, every event id, every `open` and `error` with
  the readyState at that moment, and the `ssefan-retry` / `ssefan-gap` events.
* `PageRecord` / `StreamRecord`: that record, as the test reads it back.
* `PageApp`: a loopback HTTP/1.1 app (stdlib `http.server`, keep-alive) that
  serves the page, `/ping` for the page's fetch() loop and `/auth` for
  forward-auth (admits everyone). ssefan passes it through (`app:`), so the
  page, its fetch()es and its EventSources share one origin and one connection
  pool, as they do in production.
"""

from __future__ import annotations

import http.server
import json
import threading
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit

from waits import DEFAULT_TIMEOUT

# EventSource.readyState (WHATWG HTML §9.2.1).
CONNECTING, OPEN, CLOSED = 0, 1, 2


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
