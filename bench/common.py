"""Small shared pieces: /proc readings, CPU pinning, fd limits, a latency histogram.

Nothing here starts a process or opens a socket that outlives a call.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import socket
from dataclasses import dataclass

__all__ = [
    "CpuPlan",
    "Histogram",
    "ProcSample",
    "cpu_busy",
    "foreign_cpu",
    "foreign_cpu_seconds",
    "free_port",
    "key_name",
    "plan_cpus",
    "proc_sample",
    "raise_nofile",
]

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Loopback only: every socket the benchmark opens or listens on is on this address.
HOST = "127.0.0.1"


def key_name(index: int) -> str:
    """The name of the index-th publishing key (template routes: `/jobs/<key>/progress`).

    The synthetic upstream publishes on k0 .. kK-1 and the clients subscribe to
    them by the same rule, so neither tells the other a list of names.
    """
    return f"k{index}"


def raise_nofile() -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit.

    Returns the (soft, hard) limits now in force. Called in every process the
    benchmark starts (directly or as a subprocess preexec hook), because 10 000
    to 20 000 sockets need that many descriptors in one process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else 1_048_576
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@dataclass(frozen=True, slots=True)
class CpuPlan:
    """Which CPUs the server under test and the load (clients, upstream) run on."""

    server: frozenset[int] | None
    load: frozenset[int] | None
    note: str

    def describe(self, cpus: frozenset[int] | None) -> str:
        return ",".join(str(c) for c in sorted(cpus)) if cpus else "any"


def plan_cpus() -> CpuPlan:
    """With more than one CPU: the server gets the last one, the load the rest."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return CpuPlan(None, None, f"only {len(available)} CPU available: no pinning")
    server = frozenset(available[-1:])
    load = frozenset(available[:-1])
    note = (
        f"server under test pinned to CPU {','.join(map(str, sorted(server)))};"
        f" load (clients, synthetic upstream/publisher, orchestrator) pinned to CPU"
        f" {','.join(map(str, sorted(load)))} (os.sched_setaffinity)"
    )
    return CpuPlan(server, load, note)


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds used so far and resident memory of one process."""

    cpu: float
    rss: int


def proc_sample(pid: int) -> ProcSample:
    """utime+stime from /proc/PID/stat and VmRSS from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        # Fields after the command: state is index 0, utime 11, stime 12.
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        rss = 0
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    break
        return ProcSample(cpu, rss)
    except (OSError, ValueError, IndexError):
        return ProcSample(0.0, 0)


def cpu_busy() -> dict[int, tuple[int, int, int]]:
    """Per-CPU (busy, total, softirq) jiffies from /proc/stat; softirq counts as busy."""
    out: dict[int, tuple[int, int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *values = line.split()
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            total = sum(numbers)
            out[int(name[3:])] = (total - idle, total, numbers[6])
    return out


CpuTimes = dict[int, tuple[int, int, int]]


def busy_percent(before: CpuTimes, after: CpuTimes, cpus: frozenset[int], column: int = 0) -> float:
    """Share of `cpus`' time that was busy (column 0) or in softirq (column 2)."""
    both = [c for c in cpus if c in after and c in before]
    busy = sum(after[c][column] - before[c][column] for c in both)
    total = sum(after[c][1] - before[c][1] for c in both)
    return 100.0 * busy / total if total else 0.0


def foreign_cpu(root: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every user-space process that is not `root` or its descendant.

    Keyed by (pid, start time) so a reused pid is not mistaken for the same
    process. Other people's work on the same machine shows up here, so a
    reader can tell a noisy run from a clean one.
    """
    stats: dict[int, tuple[int, int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rindex(b")") + 2 :].split()
        ppid, start = int(fields[1]), int(fields[19])
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        stats[int(entry)] = (ppid, start, cpu)
    out: dict[tuple[int, int], float] = {}
    for pid, (ppid, start, cpu) in stats.items():
        if pid == 2 or ppid == 2:
            continue  # kernel threads
        ancestor, own = pid, False
        for _ in range(64):
            if ancestor == root:
                own = True
                break
            if ancestor not in stats or ancestor <= 1:
                break
            ancestor = stats[ancestor][0]
        if not own:
            out[(pid, start)] = cpu
    return out


def foreign_cpu_seconds(
    before: dict[tuple[int, int], float], after: dict[tuple[int, int], float]
) -> float:
    """CPU seconds other processes used between two foreign_cpu() snapshots
    (processes that started in between count in full; ones that ended are missed)."""
    return sum(cpu - before.get(key, 0.0) for key, cpu in after.items())


def free_port() -> int:
    """A free loopback TCP port (for servers that can't report a port-0 bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class Histogram:
    """Log-bucketed latency histogram in microseconds (1 % resolution), mergeable."""

    BASE = 1.01
    _LOG_BASE = math.log(BASE)

    __slots__ = ("buckets", "count", "max_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        if us < 1:
            us = 1
        index = int(math.log(us) / self._LOG_BASE)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.max_us = max(self.max_us, other.max_us)

    def percentile(self, p: float) -> float:
        """The p-th percentile in microseconds (upper edge of its bucket)."""
        if not self.count:
            return math.nan
        rank = math.ceil(p / 100.0 * self.count)
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.BASE ** (index + 1), float(self.max_us))
        return float(self.max_us)

    def to_json(self) -> dict[str, object]:
        return {"buckets": {str(k): v for k, v in self.buckets.items()}, "max_us": self.max_us}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Histogram:
        h = cls()
        raw = data.get("buckets", {})
        assert isinstance(raw, dict)
        h.buckets = {int(k): int(v) for k, v in raw.items()}
        h.count = sum(h.buckets.values())
        max_us = data.get("max_us", 0)
        assert isinstance(max_us, int)
        h.max_us = max_us
        return h

    def summary_ms(self) -> dict[str, float | int]:
        def ms(us: float) -> float:
            return round(us / 1000.0, 2) if not math.isnan(us) else math.nan

        return {
            "p50": ms(self.percentile(50)),
            "p90": ms(self.percentile(90)),
            "p99": ms(self.percentile(99)),
            "max": ms(float(self.max_us)) if self.count else math.nan,
            "samples": self.count,
        }
