"""Shared fixtures: real loopback servers (an upstream SSE app, a plain HTTP app)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from app_server import TestApp
from harness import FakeUpstream


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
    """The app behind pass-through and forward-auth (tests/app_server.py)."""
    server = TestApp().start()
    try:
        yield server
    finally:
        server.close()
