"""Scenarios: one server + synthetic upstream + N clients, measured through phases.

A *session* starts the upstream and one server under test, records the
server's RSS before any client, connects N clients and waits until every one
has its response head, then runs phases. Each measured phase is a window of
``duration`` seconds after a warm-up; loss is checked through the window and
the drain that follows (publishing stops, every client must reach the last
published event). Everything the session started is stopped on exit, even on
error.

A *keyed* session (``keys=K``) puts the server's template route in front of the
synthetic upstream's per-key feeds: client g subscribes to key g // (N/K), the
upstream publishes R events/s on each of the K keys, and every check (loss,
order, the drain, another key's event) is per key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .clients import (
    ChurnSpec,
    ClientPool,
    WorkerSpec,
    merge_windows,
    split_clients,
    sum_loss,
)
from .common import (
    HOST,
    CpuPlan,
    Histogram,
    ProcSample,
    busy_percent,
    cpu_busy,
    foreign_cpu,
    foreign_cpu_seconds,
    proc_sample,
)
from .profile import Profiler
from .servers import NchanServer, ServerBase, SsefanServer, UpstreamProcess, make_server

__all__ = [
    "KEYED_SERVERS",
    "Options",
    "Session",
    "run_fanout",
    "run_idle",
    "run_keyed",
    "run_keyed_churn",
    "run_keyed_idle",
    "run_slow",
    "run_storm",
]

# Servers with per-key channels: ssefan's template route, nchan's channel ids.
# (starlette's baseline has one route; naive has no fan-out to key.)
KEYED_SERVERS = ("ssefan", "nchan")

# SO_RCVLOWAT for the clients that don't sample latency (about 30 events).
LOWAT = 8192

Record = dict[str, Any]


@dataclass
class Options:
    workdir: Path
    plan: CpuPlan
    nofile: int
    payload: int = 200
    workers: int = 2
    warmup: float = 2.0
    duration: float = 8.0
    drain_timeout: float = 10.0
    idle_settle: float = 3.0
    # Every server but the typical-Python baseline keeps up with 5000 clients at
    # this rate, so the storm measures reconnect handling, not saturation.
    storm_rate: float = 10.0
    storm_back: int = 100
    # How long the storm waits for every client to be live again.
    storm_timeout: float = 60.0
    slow_rate: float = 10.0
    # Long enough for a stalled reader to fill its 4 KiB receive buffer, the
    # server's socket send buffer and a 64 KiB user-space write buffer at the
    # slow rate, so the server's backpressure path is live during the window.
    slow_settle: float = 30.0
    # Before a session starts, wait (up to this long, and up to quiet_budget
    # over the whole run) for other processes on the machine to be quiet; their
    # CPU is reported per window either way.
    quiet_wait: float = 20.0
    quiet_budget: float = 300.0
    latency_sample: float = 0.05
    # Template routes: a key's channel is freed this long after its last client.
    key_linger: float = 1.0
    # Key churn: each churning client stays this long after its response head.
    churn_dwell: float = 0.2
    profile: bool = False
    lowat: bool = True
    notes: list[str] = field(default_factory=list)

    def cap_clients(self, n: int) -> int:
        """A server process can hold at most RLIMIT_NOFILE minus a margin sockets."""
        limit = self.nofile - 100
        if n > limit:
            self.note(
                f"{n} clients requested but RLIMIT_NOFILE hard limit is {self.nofile}:"
                f" ran {limit} (raise the hard limit to go higher)"
            )
            return limit
        return n

    def cap_idle_keys(self, n: int) -> int:
        """One idle client per key costs ssefan two sockets (client + upstream)."""
        limit = (self.nofile - 200) // 2
        if n > limit:
            self.note(
                f"{n} idle keys requested but RLIMIT_NOFILE hard limit is {self.nofile} and"
                f" each key costs ssefan two sockets (client, upstream): ran {limit} keys"
                " (and the static comparison with as many clients)"
            )
            return limit
        return n

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: float
    server: ProcSample
    upstream: ProcSample
    cpus: dict[int, tuple[int, int, int]]
    upstream_stats: dict[str, Any]
    foreign: dict[tuple[int, int], float]


def _sum_samples(pids: list[int]) -> ProcSample:
    samples = [proc_sample(p) for p in pids]
    return ProcSample(sum(s.cpu for s in samples), sum(s.rss for s in samples))


class Session:
    def __init__(
        self,
        opts: Options,
        kind: str,
        clients: int,
        *,
        scenario: str,
        slow_every: int = 0,
        full_parse: bool = False,
        keys: int = 0,
        tag: str = "",
    ) -> None:
        self.opts = opts
        self.kind = kind
        self.scenario = scenario
        self.n = opts.cap_clients(clients)
        self.requested = clients
        self.slow_every = slow_every
        self.full_parse = full_parse
        # Template route: K keys, the clients in blocks of per_key per key.
        self.keys = min(keys, self.n)
        self.per_key = math.ceil(self.n / self.keys) if self.keys else 0
        self.workdir = opts.workdir / f"{scenario}-{kind}-{clients}{'-' + tag if tag else ''}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.server: ServerBase | None = None
        self.upstream: UpstreamProcess | None = None
        self.pool: ClientPool | None = None
        self.churn: ClientPool | None = None
        self.rss_before = 0
        self.waited_for_quiet = 0.0
        self.connect: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> Session:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        opts, plan = self.opts, self.opts.plan
        self.waited_for_quiet = wait_quiet(min(opts.quiet_wait, opts.quiet_budget))
        opts.quiet_budget -= self.waited_for_quiet
        server = make_server(
            self.kind,
            self.workdir,
            plan.server,
            opts.nofile,
            keyed=bool(self.keys),
            linger=opts.key_linger,
        )
        self.server = server
        if self.keys and not server.key_path:
            raise ValueError(f"{self.kind} has no per-key channels (template routes)")
        path = server.key_path if self.keys else server.path
        # The naive baseline's server *is* the upstream: it gets the server CPU.
        upstream_cpus = plan.server if self.kind == "naive" else plan.load
        publish_to = ""
        if isinstance(server, NchanServer):
            server.start(None)
            publish_to = server.publish_url
        self.upstream = UpstreamProcess(
            self.workdir, upstream_cpus, size=opts.payload, publish_to=publish_to
        )
        if self.keys:
            self.upstream.set_rate(0, keys=self.keys)
        if not isinstance(server, NchanServer):
            server.start(self.upstream)
        if self.kind in ("ssefan", "ssefan-state", "starlette") and not self.keys:
            self._wait(lambda: self.upstream_stats()["streams"] >= 1, 30.0, "upstream subscription")
        time.sleep(1.0)  # let the server settle before the RSS baseline
        self.rss_before = _sum_samples(server.pids).rss
        per_worker = split_clients(self.n, self.opts.workers if self.n >= 200 else 1)
        offsets = [sum(per_worker[:i]) for i in range(len(per_worker))]
        sample_every = self._sample_every()
        specs = [
            WorkerSpec(
                index=i,
                host=HOST,
                port=server.port,
                path=path,
                count=count,
                sample_every=sample_every,
                slow_every=self.slow_every,
                full_parse=self.full_parse,
                track_ids=self.full_parse and self.kind == "nchan",
                id_memory=opts.storm_back + 50,
                lowat=LOWAT if opts.lowat and self.n >= 1000 and not self.full_parse else 0,
                offset=offsets[i],
                keys=self.keys,
                per_key=self.per_key,
            )
            for i, count in enumerate(per_worker)
        ]
        self.pool = ClientPool(specs)
        started = time.monotonic()
        replies = self.pool.call({"cmd": "connect"}, timeout=180.0)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        self.connect = {
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "errors": errors,
            "seconds": round(time.monotonic() - started, 2),
        }
        if self.keys and self.kind == "ssefan":
            # Heads may come before a key's upstream stream is up: start
            # measuring once every key has its subscription (or say how many
            # never got one).
            self._wait(
                lambda: self.upstream_stats()["per_key"]["publishing_keys_without_stream"] == 0,
                30.0,
                "an upstream subscription for every key",
                fail=False,
            )
            self.connect["keys_subscribed_seconds"] = round(time.monotonic() - started, 2)

    def _sample_every(self) -> int:
        wanted = max(50, math.ceil(self.n * self.opts.latency_sample))
        wanted = min(wanted, 1000, self.n)
        return max(1, self.n // wanted)

    def close(self) -> None:
        if self.churn is not None:
            self.churn.close()
            self.churn = None
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.server is not None:
            self.server.stop()
        if self.upstream is not None:
            self.upstream.stop()
            self.upstream = None
        self.server = None

    # -- helpers --------------------------------------------------------------

    @staticmethod
    def _wait(condition: Any, timeout: float, what: str, *, fail: bool = True) -> bool:
        """Poll `condition`; on timeout raise (or, with fail=False, return False)."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                if fail:
                    raise TimeoutError(f"timed out waiting for {what}")
                return False
            time.sleep(0.1)
        return True

    def upstream_stats(self) -> dict[str, Any]:
        assert self.upstream is not None
        return self.upstream.stats()

    def snapshot(self) -> Snapshot:
        assert self.server is not None and self.upstream is not None
        return Snapshot(
            at=time.monotonic(),
            server=_sum_samples(self.server.pids),
            upstream=proc_sample(self.upstream.pid),
            cpus=cpu_busy(),
            upstream_stats=self.upstream_stats(),
            foreign=foreign_cpu(os.getpid()),
        )

    def set_rate(self, rate: float) -> None:
        assert self.upstream is not None
        self.upstream.set_rate(rate)

    def call(self, cmd: dict[str, Any], timeout: float = 120.0) -> list[dict[str, Any]]:
        assert self.pool is not None
        return self.pool.call(cmd, timeout)

    def base_record(self, rate: float) -> Record:
        return {
            "scenario": self.scenario,
            "server": self.kind,
            "clients": self.n,
            "clients_requested": self.requested,
            "connected": self.connect.get("connected", 0),
            "connect_failed": self.connect.get("failed", 0),
            "connect_errors": self.connect.get("errors", {}),
            "connect_seconds": self.connect.get("seconds", 0),
            "rate": rate,
            "keys": self.keys,
            "clients_per_key": self.per_key,
            "payload": self.opts.payload,
            "rss_before_mb": round(self.rss_before / 2**20, 1),
            "rss_before_bytes": self.rss_before,
            "waited_for_quiet_s": self.waited_for_quiet,
        }

    def measures(self, s0: Snapshot, s1: Snapshot, window: dict[str, Any] | None) -> Record:
        dt = s1.at - s0.at
        plan = self.opts.plan
        up = s1.upstream_stats
        published = up["seq"] - s0.upstream_stats["seq"]
        record: Record = {
            "seconds": round(dt, 2),
            "published_eps": round(published / dt, 1),
            "server_cpu_pct": round(100 * (s1.server.cpu - s0.server.cpu) / dt, 1),
            "server_rss_mb": round(s1.server.rss / 2**20, 1),
            "server_rss_bytes": s1.server.rss,
            "rss_per_conn_kb": round((s1.server.rss - self.rss_before) / max(1, self.n) / 1024, 2),
            "upstream_connections": up["streams"],
            "upstream_peak_connections": up["peak_streams"],
            "upstream_accepted_connections": up["accepted_streams"],
            "upstream_cpu_pct": round(100 * (s1.upstream.cpu - s0.upstream.cpu) / dt, 1),
            "server_cpus_busy_pct": round(busy_percent(s0.cpus, s1.cpus, plan.server), 1)
            if plan.server
            else None,
            "server_cpus_softirq_pct": round(busy_percent(s0.cpus, s1.cpus, plan.server, 2), 1)
            if plan.server
            else None,
            "load_cpus_busy_pct": round(busy_percent(s0.cpus, s1.cpus, plan.load), 1)
            if plan.load
            else None,
            "other_processes_cpu_pct": round(
                100 * foreign_cpu_seconds(s0.foreign, s1.foreign) / dt, 1
            ),
        }
        if self.kind == "nchan":
            record["upstream_connections"] = 0
            record["publisher_connections"] = 1
            record["publisher"] = up.get("publisher")
        if self.keys:
            record["upstream_per_key"] = up["per_key"]
        if window is not None:
            record["events"] = window["events"]
            record["delivered_eps"] = round(window["events"] / dt, 1)
            record["clients_cpu_pct"] = round(100 * window["cpu"] / dt, 1)
            record["latency_ms"] = window["latency"].summary_ms()
            # Microseconds of server CPU (user + system) per event delivered
            # to a client: the cost that template routes must keep near a
            # static route's.
            if window["events"]:
                record["cpu_us_per_delivery"] = round(
                    1e6 * (s1.server.cpu - s0.server.cpu) / window["events"], 2
                )
        return record

    # -- phases ---------------------------------------------------------------

    def steady(self, rate: float, *, drain: bool = True, label: str = "") -> Record:
        """Publish at `rate`, warm up, measure a window, then (optionally) drain."""
        opts = self.opts
        self.set_rate(rate)
        self.settle(opts.warmup)
        return self.window(rate, drain=drain, label=label)

    def settle(self, seconds: float) -> None:
        """Sleep `seconds`; if other processes were busy meanwhile, wait for quiet
        (within the run's quiet budget) so the window that follows is clean."""
        root = os.getpid()
        before = foreign_cpu(root)
        time.sleep(seconds)
        busy = 100 * foreign_cpu_seconds(before, foreign_cpu(root)) / max(seconds, 0.1)
        if busy >= QUIET_CPU_PCT and self.opts.quiet_budget > 0:
            waited = wait_quiet(min(self.opts.quiet_wait, self.opts.quiet_budget))
            self.opts.quiet_budget -= waited
            self.waited_for_quiet += waited

    def window(self, rate: float, *, drain: bool = True, label: str = "") -> Record:
        opts = self.opts
        profiler = None
        if opts.profile and self.kind == "ssefan" and self.server is not None:
            name = (
                f"profile-{self.scenario}-{self.n}-{rate:g}{'-' + label[:4] if label else ''}.txt"
            )
            profiler = Profiler(self.server.pids[0], self.workdir / name, opts.duration)
        m0 = self.server_metrics()
        s0 = self.snapshot()
        loss0 = sum_loss(self.call({"cmd": "window_start"}))
        time.sleep(opts.duration)
        window = merge_windows(self.call({"cmd": "window_end"}))
        s1 = self.snapshot()
        record = self.base_record(rate)
        if label:
            record["phase"] = label
        record.update(self.measures(s0, s1, window))
        loss1 = window
        if drain:
            loss1 = self.drain()
            record["behind_at_end"] = loss1["behind"]
            record["behind_events_at_end"] = loss1["behind_events"]
        for key in ("lost", "dup", "ooo", "wrong_key", "disconnects"):
            record[key] = loss1[key] - loss0[key]
        if drain:
            # Since the clients connected (windows count only their own span).
            record["session_loss"] = {k: loss1[k] for k in ("lost", "dup", "ooo", "wrong_key")}
        record["open_at_end"] = loss1["open"]
        if loss1.get("examples"):
            record["loss_examples"] = loss1["examples"]
        if profiler is not None:
            record["profile"] = profiler.wait()
        record.update(self.server_counters(m0))
        return record

    def server_metrics(self) -> dict[str, float]:
        return self.server.metrics() if isinstance(self.server, SsefanServer) else {}

    def server_counters(self, before: dict[str, float]) -> Record:
        """ssefan's own view (admin /metrics): disconnects by reason in the window."""
        after = self.server_metrics()
        if not after:
            return {}
        reasons: dict[str, int] = {}
        for key, value in after.items():
            if key.startswith("ssefan_disconnects_total{") and 'reason="' in key:
                reason = key.split('reason="', 1)[1].split('"', 1)[0]
                delta = int(value - before.get(key, 0.0))
                if delta:
                    reasons[reason] = reasons.get(reason, 0) + delta
        clients = sum(v for k, v in after.items() if k.startswith("ssefan_clients{"))
        return {"ssefan_disconnects": reasons, "ssefan_clients": int(clients)}

    def drain(self) -> dict[str, Any]:
        self.set_rate(0)
        time.sleep(0.2)
        targets = self.upstream_stats()["key_seqs"]  # the last event of each key
        replies = self.call(
            {"cmd": "drain", "targets": targets, "timeout": self.opts.drain_timeout},
            timeout=self.opts.drain_timeout + 60,
        )
        return {
            "behind": sum(r["behind"] for r in replies),
            "behind_events": sum(r["behind_events"] for r in replies),
            **sum_loss(replies),
        }

    # -- key churn ------------------------------------------------------------

    def churn_start(self, rate: float) -> None:
        """A client process of its own opens new keys at `rate`/s until churn_stop()."""
        assert self.server is not None and self.churn is None
        spec = WorkerSpec(
            index=self.opts.workers,
            host=HOST,
            port=self.server.port,
            path=self.server.key_path,
            count=0,
            sample_every=1,
        )
        self.churn = ClientPool([spec])
        churn = ChurnSpec(rate=rate, dwell=self.opts.churn_dwell, prefix="churn")
        self.churn.call({"cmd": "churn_start", "spec": dataclasses.asdict(churn)})

    def churn_stop(self) -> dict[str, Any]:
        assert self.churn is not None
        (reply,) = self.churn.call({"cmd": "churn_stop"}, timeout=60.0)
        self.churn.close()
        self.churn = None
        return reply

    def idle(self) -> Record:
        self.set_rate(0)
        time.sleep(self.opts.idle_settle)
        s0 = self.snapshot()
        time.sleep(self.opts.idle_settle)
        s1 = self.snapshot()
        record = self.base_record(0)
        record.update(self.measures(s0, s1, None))
        return record


QUIET_CPU_PCT = 15.0


def wait_quiet(limit: float) -> float:
    """Wait until other processes use < QUIET_CPU_PCT of a core (1 s samples).

    Returns the seconds waited. Gives up after `limit`: the measurement then
    goes ahead and its other_processes_cpu_pct says how noisy it was.
    """
    started = time.monotonic()
    root = os.getpid()
    while time.monotonic() - started < limit:
        before = foreign_cpu(root)
        time.sleep(1.0)
        if 100 * foreign_cpu_seconds(before, foreign_cpu(root)) < QUIET_CPU_PCT:
            break
    return round(max(0.0, time.monotonic() - started - 1.0), 1)


def run_fanout(opts: Options, kind: str, clients: int, rates: list[float]) -> list[Record]:
    records: list[Record] = []
    with Session(opts, kind, clients, scenario="fanout") as session:
        for rate in rates:
            records.append(session.steady(rate))
    return records


def run_idle(opts: Options, kind: str, clients: int) -> list[Record]:
    with Session(opts, kind, clients, scenario="idle") as session:
        return [session.idle()]


def run_slow(opts: Options, kind: str, clients: int) -> list[Record]:
    """Phase A: everyone reads. Phase B: 1 % stop reading. Same clients, same rate."""
    rate = opts.slow_rate
    with Session(opts, kind, clients, scenario="slow", slow_every=100) as session:
        without = session.steady(rate, drain=False, label="without slow readers")
        stopped = sum(r["stopped"] for r in session.call({"cmd": "stop_slow"}))
        time.sleep(opts.slow_settle)
        with_slow = session.window(rate, drain=True, label="with 1% slow readers")
        resumed = session.call({"cmd": "resume_slow"})
        with_slow["slow_readers"] = stopped
        with_slow["slow_open_before_resume"] = sum(r["open_before_resume"] for r in resumed)
        with_slow["slow_cut_off_by_server"] = sum(r["cut_off"] for r in resumed)
        with_slow["slow_unread_kib_each"] = round(
            sum(r["unread_bytes"] for r in resumed) / max(1, stopped) / 1024, 1
        )
        without["slow_readers"] = 0
        return [without, with_slow]


def run_storm(opts: Options, kind: str, clients: int) -> list[Record]:
    """All clients drop and reconnect at once, `storm_back` events behind."""
    rate = opts.storm_rate
    with Session(opts, kind, clients, scenario="storm", full_parse=True) as session:
        session.set_rate(rate)
        # Enough history for every client to go `storm_back` events back.
        session.settle(opts.storm_back / rate + opts.warmup)
        s0 = session.snapshot()
        loss0 = sum_loss(session.call({"cmd": "window_start"}))
        t0 = time.monotonic_ns() + 300_000_000
        timeout = opts.storm_timeout
        head = session.upstream_stats()["seq"]
        replies = session.call(
            {"cmd": "storm", "t0": t0, "back": opts.storm_back, "timeout": timeout, "head": head},
            timeout=timeout + 30,
        )
        window = merge_windows(session.call({"cmd": "window_end"}))
        s1 = session.snapshot()
        after = session.drain()
        record = session.base_record(rate)
        record.update(session.measures(s0, s1, window))
        record["lost"] = after["lost"] - loss0["lost"]
        record["dup"] = after["dup"] - loss0["dup"]
        record["ooo"] = after["ooo"] - loss0["ooo"]
        record["behind_at_end"] = after["behind"]
        record["disconnects"] = after["disconnects"] - loss0["disconnects"]
        if after.get("examples"):
            record["loss_examples"] = after["examples"]
        record["storm"] = _storm_summary(replies, opts.storm_back)
        return [record]


def _storm_summary(replies: list[dict[str, Any]], back: int) -> Record:
    def stats(key: str) -> dict[str, float | int]:
        values: list[float] = sorted(float(v) for r in replies for v in r[key])
        if not values:
            return {"n": 0}

        def pick(p: float) -> float:
            return round(values[min(len(values) - 1, math.ceil(p / 100 * len(values)) - 1)], 1)

        return {"n": len(values), "p50": pick(50), "p99": pick(99), "max": round(values[-1], 1)}

    lags = sorted(v for r in replies for v in r["lag_before"])
    return {
        "clients": sum(r["clients"] for r in replies),
        "back": back,
        # How far behind the live head clients were just before the storm: a
        # server that can't keep up at this rate was saturated before it began.
        "lag_before_events": {
            "p50": lags[len(lags) // 2] if lags else None,
            "max": lags[-1] if lags else None,
        },
        "not_done": sum(r["not_done"] for r in replies),
        "reconnected_ms": stats("head_ms"),
        "replayed_ms": stats("replayed_ms"),
        "live_ms": stats("live_ms"),
    }


# -- template routes ------------------------------------------------------------


def run_keyed(opts: Options, kind: str, keys: int, per_key: int, rate: float) -> list[Record]:
    """K keys x C clients at R/s per key; for ssefan also one static route with
    the same clients and rate (same total deliveries) to compare CPU per delivery."""
    n = keys * per_key
    with Session(opts, kind, n, scenario="keyed", keys=keys) as session:
        keyed = session.steady(rate, label="keyed")
    records = [keyed]
    if kind == "ssefan":
        with Session(opts, kind, n, scenario="keyed", tag="static") as session:
            static = session.steady(rate, label="static")
        keyed["cpu_per_delivery_vs_static"] = _ratio(
            keyed.get("cpu_us_per_delivery"), static.get("cpu_us_per_delivery")
        )
        records.append(static)
    return records


def run_keyed_idle(opts: Options, kind: str, keys: int) -> list[Record]:
    """N keys x 1 idle client, then N idle clients on one static route: the
    difference is what a key's channel itself costs (ring empty)."""
    n = opts.cap_idle_keys(keys)
    with Session(opts, kind, n, scenario="keyed-idle", keys=n) as session:
        keyed = session.idle()
        keyed["phase"] = "keyed"
    with Session(opts, kind, n, scenario="keyed-idle", tag="static") as session:
        static = session.idle()
        static["phase"] = "static"
    grown_keyed = keyed["server_rss_bytes"] - keyed["rss_before_bytes"]
    grown_static = static["server_rss_bytes"] - static["rss_before_bytes"]
    keyed["rss_per_idle_channel_kb"] = round((grown_keyed - grown_static) / max(1, n) / 1024, 2)
    # The same from absolute RSS (includes the two processes' baseline difference).
    keyed["rss_per_idle_channel_abs_kb"] = round(
        (keyed["server_rss_bytes"] - static["server_rss_bytes"]) / max(1, n) / 1024, 2
    )
    return [keyed, static]


CHANNELS = "ssefan_channels"
CHANNELS_OPENED = "ssefan_channels_opened_total"
CHANNELS_CLOSED = "ssefan_channels_closed_total"


def _metric(metrics: dict[str, float], name: str) -> float:
    """The sum of a family's samples (e.g. over reasons)."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


def _closed_by_reason(metrics: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(CHANNELS_CLOSED + "{") and 'reason="' in key:
            reason = key.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = out.get(reason, 0.0) + value
    return out


def run_keyed_churn(
    opts: Options, kind: str, keys: int, per_key: int, rate: float, churn_rate: float
) -> list[Record]:
    """Existing streams (K keys x C clients at R/s) measured without, then with,
    new keys opened at `churn_rate`/s (each client stays churn_dwell, each key
    lingers key_linger after it)."""
    if kind != "ssefan":
        raise ValueError("keyed-churn reads ssefan's channel metrics: ssefan only")
    with Session(opts, kind, keys * per_key, scenario="keyed-churn", keys=keys) as session:
        without = session.steady(rate, drain=False, label="without churn")
        m0 = session.server_metrics()
        u0 = session.upstream_stats()
        session.churn_start(churn_rate)
        session.settle(opts.warmup)
        with_churn = session.window(rate, drain=True, label="with churn")
        churned = session.churn_stop()
        # Every churned key's channel is freed key_linger after its client left.
        session._wait(
            lambda: _metric(session.server_metrics(), CHANNELS) <= session.keys,
            opts.key_linger + 10.0,
            "the churned keys' channels to close",
            fail=False,
        )
        m1 = session.server_metrics()
        u1 = session.upstream_stats()
    closed0, closed1 = _closed_by_reason(m0), _closed_by_reason(m1)
    head = Histogram.from_json(churned.pop("head_hist"))
    opened = int(_metric(m1, CHANNELS_OPENED) - _metric(m0, CHANNELS_OPENED))
    accepted = u1["accepted_streams"] - u0["accepted_streams"]
    with_churn["churn"] = {
        "rate": churn_rate,
        "dwell_s": opts.churn_dwell,
        "linger_s": opts.key_linger,
        **churned,
        "opened_per_s": round(churned["opened"] / max(churned["seconds"], 0.1), 1),
        "head_ms": head.summary_ms(),
        "ssefan_channels_opened": opened,
        "ssefan_channels_closed": {
            reason: int(closed1[reason] - closed0.get(reason, 0.0))
            for reason in sorted(closed1)
            if closed1[reason] - closed0.get(reason, 0.0)
        },
        "ssefan_channels_at_end": int(_metric(m1, CHANNELS)),
        "upstream_connections_opened": accepted,
        "upstream_keys_opened": u1["per_key"]["keys_accepted"] - u0["per_key"]["keys_accepted"],
        "upstream_open_at_end": u1["streams"],
        "upstream_per_key_at_end": u1["per_key"],
    }
    with_churn["p99_vs_without_churn"] = _ratio(
        (with_churn.get("latency_ms") or {}).get("p99"),
        (without.get("latency_ms") or {}).get("p99"),
    )
    return [without, with_churn]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 3)
