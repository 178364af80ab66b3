"""Waiting on a condition, shared by every helper: tests poll for what they expect, never sleep.

`DEFAULT_TIMEOUT` bounds every wait, socket read and shutdown in tests/support,
so a hung test fails in seconds with a message instead of at pytest-timeout.
Everything in tests/support binds port 0, waits on conditions (never fixed
sleeps), and stops what it started.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_TIMEOUT = 10.0


def wait_until(
    condition: Callable[[], bool], timeout: float = DEFAULT_TIMEOUT, what: str = ""
) -> None:
    """Poll `condition` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.01)


def holds_for(condition: Callable[[], bool], duration: float, what: str = "") -> None:
    """Assert `condition` stays true for `duration` seconds (for "nothing happens").

    Only for absences, which no event can signal; never for waiting on something.
    """
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        if not condition():
            raise AssertionError(f"stopped holding: {what or condition}")
        time.sleep(0.01)
    if not condition():
        raise AssertionError(f"stopped holding: {what or condition}")
