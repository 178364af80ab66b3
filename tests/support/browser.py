"""A headless Chromium driven over the DevTools protocol, for tests of real EventSources.

* `Chromium`: Debian's `chromium` as a subprocess on a fresh profile, with the
  flags that keep it quiet (no background networking, updates or sync: without
  them it opens connections of its own), its DevTools port read from the
  `DevToolsActivePort` file it writes into the profile.
* `Page`: one tab over CDP (a WebSocket; `websockets`' sync client). The test
  reads what the page recorded with `Runtime.evaluate`; `Network` events are
  kept too, so a failure can show each stream response's status and whether it
  came on a reused keep-alive connection.

The page itself, its record and the app serving it are `eventsource_page`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from eventsource_page import PageRecord
from waits import DEFAULT_TIMEOUT, wait_until
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
