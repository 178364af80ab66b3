"""Shared fixtures: a real upstream SSE app on loopback for every test that asks."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    try:
        yield server
    finally:
        server.close()
