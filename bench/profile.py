"""Optional py-spy sampling of the server under test during a measured window.

``python -m bench run --profile`` records ssefan with py-spy (``--native`` so
uvloop's C frames show, ``--idle`` so time spent waiting in epoll shows too;
native stacks need py-spy to pause the process at each sample, so a profiled
run's numbers are slightly pessimistic -- profile separately from a measured run)
for each fan-out window, keeps the collapsed stacks next to the results, and
puts a summary -- the functions with the most samples, on-CPU and total -- in
the record.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["Profiler", "summarize"]

RATE = 250  # samples per second


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """A py-spy record subprocess for `seconds` seconds; wait() reaps it."""

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        exe = _py_spy()
        if exe is None:
            return
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(max(1, int(seconds))),
                "--rate",
                str(RATE),
                "--format",
                "raw",
                "--native",
                "--idle",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self) -> dict[str, Any] | None:
        if self.proc is None:
            return None
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        return summarize(self.out) if self.out.exists() else None


IDLE_MARKERS = ("epoll_wait", "epoll_pwait", "select (selectors.py")


def _short(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    path, _, line = where.rpartition(":")
    return f"{name} ({Path(path).name}:{line})" if path else frame


def _function(frame: str) -> str:
    """ "Channel._fan_out (/x/ssefan/channel.py:384)" -> "Channel._fan_out (channel.py)"."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.rpartition(':')[0]).name})"


def summarize(path: Path, top: int = 14, package: str = "(ssefan/") -> dict[str, Any]:
    """Where the busy samples (the ones not waiting in epoll) are.

    `busy_self_pct`: the innermost frame (a C function such as write() is
    named as such). `busy_inclusive_pct`: functions of `package` that are on
    the stack, by function -- what the time was spent *for*.
    """
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith("process ")]
        if not frames:
            continue
        total += count
        if any(marker in frames[-1] for marker in IDLE_MARKERS):
            idle += count
            continue
        leaf[_short(frames[-1])] += count
        for function in {_function(f) for f in frames if package in f}:
            inclusive[function] += count
    busy = total - idle

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / busy, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "idle_pct": round(100 * idle / total, 1) if total else None,
        "busy_self_pct": share(leaf),
        "busy_inclusive_pct": share(inclusive),
        "raw": str(path),
    }
