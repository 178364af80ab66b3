"""`ssefan demo`: "Resume from an unknown id" must show the gap, not bury it
under the replay that follows. The page has a banner for `ssefan-gap`; the
real demo sends what the banner reads; and in headless Chromium (when there)
the banner is on screen after the button is clicked."""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import Chromium, chromium_binary
from faults import free_port
from opsharness import get
from sse_clients import SSEClient
from ssefan_process import CommandProcess
from waits import DEFAULT_TIMEOUT, wait_until

from ssefan import demo


@pytest.fixture
def running_demo(tmp_path: Path) -> Iterator[CommandProcess]:
    argv = [sys.executable, "-m", "ssefan", "demo", "--port", str(free_port())]
    proc = CommandProcess(tmp_path / "no-config", argv).start()
    try:
        yield proc
    finally:
        proc.stop()


def test_the_page_listens_for_the_gap_and_has_a_banner() -> None:
    page = demo._page().decode()
    assert 'source.addEventListener("ssefan-gap"' in page
    assert 'id="gap-banner" role="alert" hidden' in page
    assert 'id="gap-dismiss"' in page
    # The banner reads the gap event's fields.
    for field in ("gap.reason", "gap.oldest_id", "gap.last_event_id", "gap.policy"):
        assert field in page


def test_the_demo_serves_the_page_and_a_gap_with_what_the_banner_shows(
    running_demo: CommandProcess,
) -> None:
    status, content_type, body = get(running_demo.url + "/")
    assert status == 200 and content_type.startswith("text/html")
    assert b"gap-banner" in body
    gaps: list[dict[str, object]] = []

    def gap_with_oldest_id() -> bool:
        # Until the first tick reached ssefan its buffer is empty (oldest_id null).
        stream = SSEClient(running_demo.host, running_demo.port, "/events?last_event_id=nope")
        try:
            first = stream.read_events(1)[0]
        finally:
            stream.close()
        assert first.event == "ssefan-gap"
        gaps[:] = [json.loads(first.data)]
        return gaps[0]["oldest_id"] is not None

    wait_until(gap_with_oldest_id, DEFAULT_TIMEOUT, "a gap event with an oldest id")
    assert gaps[0]["reason"] == "unknown" and gaps[0]["last_event_id"] == "nope"


def test_the_banner_is_on_screen_after_resume_from_an_unknown_id(
    running_demo: CommandProcess, tmp_path: Path
) -> None:
    browser = Chromium(chromium_binary()).start()
    try:
        page = browser.new_page()
        try:
            page.call("Page.navigate", {"url": running_demo.url + "/"})
            ticks = "document.querySelectorAll('#log li:not(.note)').length"
            wait_until(lambda: bool(page.evaluate(f"{ticks} >= 2")), DEFAULT_TIMEOUT, "ticks")
            assert page.evaluate("document.getElementById('gap-banner').hidden") is True
            page.evaluate("document.getElementById('bogus').click()")
            shown = "(() => { const b = document.getElementById('gap-banner');"
            shown += " return !b.hidden && b.offsetHeight > 0; })()"
            wait_until(lambda: bool(page.evaluate(shown)), DEFAULT_TIMEOUT, "the gap banner")
            text = page.evaluate("document.getElementById('gap-banner').innerText")
            assert "Reason: unknown" in text
            assert '"no-such-id" is unknown to ssefan' in text
            assert "oldest id held: " in text
            shot = page.call("Page.captureScreenshot", {"format": "png"})["data"]
            (tmp_path / "demo-gap.png").write_bytes(base64.b64decode(shot))
            page.evaluate("document.getElementById('gap-dismiss').click()")
            assert page.evaluate("document.getElementById('gap-banner').hidden") is True
        finally:
            page.close()
    finally:
        browser.close()
