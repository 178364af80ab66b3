"""Shared fixtures: real loopback servers (an upstream SSE app, a plain HTTP app)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from app_server import TestApp
from browser import Chromium, Page, chromium_binary
from eventsource_page import PageApp
from raw_http import OPEN_SOCKETS
from sse_upstream import FakeUpstream


@pytest.fixture(autouse=True)
def close_left_sockets() -> Iterator[None]:
    """Close the client sockets a test opened and left open (see OPEN_SOCKETS).

    Module-scoped fixtures are set up before this one, so their clients are in
    `before` and stay open for the module's other tests.
    """
    before = set(OPEN_SOCKETS)
    yield
    for sock in set(OPEN_SOCKETS) - before:
        sock.close()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def stream_upstream() -> Iterator[FakeUpstream]:
    """One upstream shared by a module's tests (behind a module-scoped ssefan)."""
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def app() -> Iterator[TestApp]:
    """The app behind pass-through and forward-auth (tests/support/app_server.py)."""
    server = TestApp().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh event loop, not running: for code driven step by step in memory."""
    loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.close()


# The browser suites (test_browser.py, test_browser_restart.py): one headless
# Chromium per module, a fresh tab per test, the page app with the EventSource page.


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    browser = Chromium(chromium_binary()).start()
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture
def page(chromium: Chromium) -> Iterator[Page]:
    tab = chromium.new_page()
    try:
        yield tab
    finally:
        tab.close()


@pytest.fixture(scope="module")
def page_app() -> Iterator[PageApp]:
    app = PageApp().start()
    try:
        yield app
    finally:
        app.close()
