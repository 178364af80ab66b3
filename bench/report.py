"""Results: JSON per scenario, a markdown report with targets, PNG charts."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["machine_info", "targets", "write_charts", "write_json", "write_markdown"]

Record = dict[str, Any]
SERVER_ORDER = ("ssefan", "nchan", "starlette", "naive")


def machine_info(nofile: tuple[int, int]) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str] = {}
    for package in ("ssefan", "uvloop", "h11", "sse-starlette", "starlette", "uvicorn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    nginx = shutil.which("nginx")
    if nginx:
        out = subprocess.run([nginx, "-v"], capture_output=True, text=True)
        versions["nginx"] = out.stderr.strip().rsplit("/", 1)[-1]
        dpkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan"],
            capture_output=True,
            text=True,
        )
        if dpkg.returncode == 0:
            versions["nchan (libnginx-mod-nchan)"] = dpkg.stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "rlimit_nofile": list(nofile),
        "versions": versions,
    }


def write_json(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_json_default))
    by_scenario: dict[str, list[Record]] = {}
    for record in report["records"]:
        by_scenario.setdefault(record["scenario"], []).append(record)
    for scenario, records in by_scenario.items():
        (out / f"{scenario}.json").write_text(
            json.dumps(
                {"meta": report["meta"], "records": records}, indent=2, default=_json_default
            )
        )


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# -- lookups -----------------------------------------------------------------


def _find(records: Iterable[Record], **match: Any) -> Record | None:
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float | int):
        if digits == 0:
            return f"{value:,.0f}"
        return f"{value:,.{digits}f}"
    return str(value)


def _lat(record: Record, key: str) -> float | None:
    lat = record.get("latency_ms") or {}
    value = lat.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _servers(records: list[Record]) -> list[str]:
    present = {r["server"] for r in records}
    return [s for s in SERVER_ORDER if s in present]


# -- targets -----------------------------------------------------------------


def targets(records: list[Record]) -> list[dict[str, Any]]:
    """Each target with ssefan's value, nchan's, the ratio and a verdict (not asserted)."""
    out: list[dict[str, Any]] = []
    fan = [r for r in records if r["scenario"] == "fanout"]
    top_n = max((r["clients"] for r in fan), default=0)
    top_rate = max((r["rate"] for r in fan), default=0)
    s = _find(fan, server="ssefan", clients=top_n, rate=top_rate)
    n = _find(fan, server="nchan", clients=top_n, rate=top_rate)
    if s is not None:
        ratio = s["delivered_eps"] / n["delivered_eps"] if n and n["delivered_eps"] else None
        zero = s["lost"] == 0 and s["dup"] == 0 and s["ooo"] == 0
        out.append(
            {
                "target": f"delivered events/s at {top_n:,} clients x {top_rate:g}/s"
                " >= 3x nchan, zero loss",
                "ssefan": f"{_fmt(s['delivered_eps'])}/s, lost {s['lost']}, dup {s['dup']}",
                "nchan": f"{_fmt(n['delivered_eps'])}/s" if n else "not run",
                "ratio": ratio,
                "met": (ratio is not None and ratio >= 3 and zero) if n else None,
            }
        )
    mid_rate = 10.0 if any(r["rate"] == 10 for r in fan) else top_rate
    s = _find(fan, server="ssefan", clients=top_n, rate=mid_rate)
    n = _find(fan, server="nchan", clients=top_n, rate=mid_rate)
    if s is not None:
        sp, np_ = _lat(s, "p99"), (_lat(n, "p99") if n else None)
        ratio = sp / np_ if sp is not None and np_ else None
        out.append(
            {
                "target": f"p99 latency at {top_n:,} clients x {mid_rate:g}/s <= 0.75x nchan",
                "ssefan": f"{_fmt(sp, 1)} ms",
                "nchan": f"{_fmt(np_, 1)} ms" if n else "not run",
                "ratio": ratio,
                "met": (ratio is not None and ratio <= 0.75) if n else None,
            }
        )
    idle = [r for r in records if r["scenario"] == "idle" and r["server"] == "ssefan"]
    idle10 = _find(idle, clients_requested=10_000) or (idle[0] if idle else None)
    if idle10 is not None:
        kb = idle10["rss_per_conn_kb"]
        n = _find(records, scenario="idle", server="nchan", clients=idle10["clients"])
        out.append(
            {
                "target": f"RSS per idle connection at {idle10['clients']:,} <= 3 KB",
                "ssefan": f"{kb:.2f} KiB",
                "nchan": f"{n['rss_per_conn_kb']:.2f} KiB" if n else "not run",
                "ratio": kb / n["rss_per_conn_kb"] if n and n["rss_per_conn_kb"] else None,
                "met": kb <= 3.0,
            }
        )
    ours = [r for r in records if r["server"] == "ssefan"]
    if ours:
        counts = sorted({r["upstream_peak_connections"] for r in ours})
        out.append(
            {
                "target": "exactly 1 upstream connection per route per worker, whatever N",
                "ssefan": f"peak upstream connections over all runs: {counts}",
                "nchan": "publisher: 1 connection (push model)",
                "ratio": None,
                "met": counts == [1],
            }
        )
    return out


# -- markdown ----------------------------------------------------------------


def write_markdown(out: Path, report: dict[str, Any]) -> str:
    records: list[Record] = report["records"]
    meta = report["meta"]
    lines: list[str] = []
    add = lines.append
    machine = meta["machine"]
    add(f"Run {meta['started']} -- `{meta['command']}`")
    add("")
    add(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']},"
        f" Python {machine['python']}, RLIMIT_NOFILE {machine['rlimit_nofile']}."
        f" {meta['pinning']}."
    )
    add("")
    add("### Targets (reported, not asserted)")
    add("")
    add("| target | ssefan | nchan | ratio | met |")
    add("|---|---|---|---|---|")
    for t in report["targets"]:
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        add(f"| {t['target']} | {t['ssefan']} | {t['nchan']} | {_fmt(t['ratio'], 2)} | {met} |")
    add("")
    _key_points(records, add)
    _fanout_table(records, add)
    _idle_table(records, add)
    _storm_table(records, add)
    _slow_table(records, add)
    if meta.get("notes"):
        add("### Notes")
        add("")
        for note in meta["notes"]:
            add(f"- {note}")
        add("")
    text = "\n".join(lines)
    (out / "table.md").write_text(text)
    return text


def _key_points(records: list[Record], add: Any) -> None:
    fan = [r for r in records if r["scenario"] == "fanout"]
    if not fan:
        return
    servers = _servers(records)
    top_n = max(r["clients"] for r in fan)
    rates = sorted({r["rate"] for r in fan})
    add(f"### Key points, side by side ({top_n:,} clients)")
    add("")
    add("| measure | " + " | ".join(servers) + " |")
    add("|---|" + "---|" * len(servers))
    for rate in rates:
        row = [_find(fan, server=s, clients=top_n, rate=rate) for s in servers]
        add(
            f"| delivered events/s at {rate:g}/s (offered {top_n * rate:,.0f}) | "
            + " | ".join(_fmt(r["delivered_eps"]) if r else "-" for r in row)
            + " |"
        )
        add(
            f"| p50 / p99 / max latency ms at {rate:g}/s | "
            + " | ".join(
                f"{_fmt(_lat(r, 'p50'), 1)} / {_fmt(_lat(r, 'p99'), 1)} / {_fmt(_lat(r, 'max'), 0)}"
                if r
                else "-"
                for r in row
            )
            + " |"
        )
        add(
            f"| server CPU % of a core at {rate:g}/s | "
            + " | ".join(_fmt(r["server_cpu_pct"]) if r else "-" for r in row)
            + " |"
        )
        add(
            f"| lost / dup / behind-at-end at {rate:g}/s | "
            + " | ".join(
                f"{r['lost']} / {r['dup']} / {r.get('behind_at_end', 0)}" if r else "-" for r in row
            )
            + " |"
        )
    row = [_find(fan, server=s, clients=top_n, rate=rates[-1]) for s in servers]
    add(
        "| upstream connections | "
        + " | ".join(
            (
                "0 (1 publisher)"
                if r and r["server"] == "nchan"
                else (_fmt(r["upstream_peak_connections"]) if r else "-")
            )
            for r in row
        )
        + " |"
    )
    add(
        f"| upstream CPU % at {rates[-1]:g}/s | "
        + " | ".join(_fmt(r["upstream_cpu_pct"]) if r else "-" for r in row)
        + " |"
    )
    idle = [r for r in records if r["scenario"] == "idle"]
    for n in sorted({r["clients"] for r in idle}):
        row = [_find(idle, server=s, clients=n) for s in servers]
        add(
            f"| idle RSS per connection KiB at {n:,} | "
            + " | ".join(_fmt(r["rss_per_conn_kb"], 2) if r else "-" for r in row)
            + " |"
        )
    storm = [r for r in records if r["scenario"] == "storm"]
    if storm:
        row = [_find(storm, server=s) for s in servers]
        add(
            "| storm: all live again (ms) / lost+dup | "
            + " | ".join(
                f"{_fmt(r['storm']['live_ms'].get('max'))} / {r['lost'] + r['dup']}" if r else "-"
                for r in row
            )
            + " |"
        )
    slow = [r for r in records if r["scenario"] == "slow"]
    if slow:
        cells = []
        for s in servers:
            a = _find(slow, server=s, phase="without slow readers")
            b = _find(slow, server=s, phase="with 1% slow readers")
            cells.append(
                f"{_fmt(_lat(a, 'p99'), 1)} -> {_fmt(_lat(b, 'p99'), 1)}" if a and b else "-"
            )
        add("| slow readers: p99 ms of the 99 % (without -> with) | " + " | ".join(cells) + " |")
    add("")


def _fanout_table(records: list[Record], add: Any) -> None:
    fan = [r for r in records if r["scenario"] == "fanout"]
    if not fan:
        return
    add("### Fan-out (all points)")
    add("")
    add(
        "| server | clients | rate/s | delivered ev/s | lost | dup | ooo | behind | p50 ms"
        " | p99 ms | max ms | server CPU % | server core busy % (softirq) | RSS MB"
        " | RSS/conn KiB | upstream conns | upstream CPU % | clients CPU % | load core busy %"
        " | other procs CPU % |"
    )
    add("|---" * 20 + "|")
    for r in sorted(fan, key=lambda r: (r["clients"], r["rate"], _order(r["server"]))):
        add(
            f"| {r['server']} | {r['clients']:,} | {r['rate']:g} | {_fmt(r['delivered_eps'])}"
            f" | {r['lost']} | {r['dup']} | {r['ooo']} | {r.get('behind_at_end', 0)}"
            f" | {_fmt(_lat(r, 'p50'), 1)} | {_fmt(_lat(r, 'p99'), 1)}"
            f" | {_fmt(_lat(r, 'max'), 0)} | {_fmt(r['server_cpu_pct'])}"
            f" | {_fmt(r['server_cpus_busy_pct'])} ({_fmt(r.get('server_cpus_softirq_pct'))})"
            f" | {_fmt(r['server_rss_mb'], 1)} | {_fmt(r['rss_per_conn_kb'], 2)}"
            f" | {_upstream_conns(r)} | {_fmt(r['upstream_cpu_pct'])}"
            f" | {_fmt(r.get('clients_cpu_pct'))} | {_fmt(r['load_cpus_busy_pct'])}"
            f" | {_fmt(r.get('other_processes_cpu_pct'))} |"
        )
    add("")


def _upstream_conns(r: Record) -> str:
    if r["server"] == "nchan":
        return "0 (+1 publisher)"
    return _fmt(r["upstream_peak_connections"])


def _order(server: str) -> int:
    return SERVER_ORDER.index(server) if server in SERVER_ORDER else 99


def _idle_table(records: list[Record], add: Any) -> None:
    idle = [r for r in records if r["scenario"] == "idle"]
    if not idle:
        return
    add("### Idle memory")
    add("")
    add("| server | idle streams | RSS before MB | RSS after MB | RSS/conn KiB | idle CPU % |")
    add("|---|---|---|---|---|---|")
    for r in sorted(idle, key=lambda r: (r["clients"], _order(r["server"]))):
        add(
            f"| {r['server']} | {r['clients']:,} | {_fmt(r['rss_before_mb'], 1)}"
            f" | {_fmt(r['server_rss_mb'], 1)} | {_fmt(r['rss_per_conn_kb'], 2)}"
            f" | {_fmt(r['server_cpu_pct'], 1)} |"
        )
    add("")


def _storm_table(records: list[Record], add: Any) -> None:
    storm = [r for r in records if r["scenario"] == "storm"]
    if not storm:
        return
    r0 = storm[0]
    add(
        f"### Reconnect storm ({r0['clients']:,} clients drop and reconnect at once,"
        f" Last-Event-ID {r0['storm']['back']} events back, {r0['rate']:g} events/s flowing)"
    )
    add("")
    add(
        "| server | lag before storm, events (p50 / max) | all reconnected ms (p50)"
        " | all replayed ms (p50) | all live ms (p50) | not done | lost | dup | ooo"
        " | server CPU % | RSS MB |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(storm, key=lambda r: _order(r["server"])):
        st = r["storm"]

        def cell(key: str, st: dict[str, Any] = st) -> str:
            v = st[key]
            return f"{_fmt(v.get('max'))} ({_fmt(v.get('p50'))})" if v.get("n") else "-"

        lag = st.get("lag_before_events", {})
        add(
            f"| {r['server']} | {_fmt(lag.get('p50'))} / {_fmt(lag.get('max'))}"
            f" | {cell('reconnected_ms')} | {cell('replayed_ms')}"
            f" | {cell('live_ms')} | {st['not_done']} | {r['lost']} | {r['dup']} | {r['ooo']}"
            f" | {_fmt(r['server_cpu_pct'])} | {_fmt(r['server_rss_mb'], 1)} |"
        )
    add("")


def _slow_table(records: list[Record], add: Any) -> None:
    slow = [r for r in records if r["scenario"] == "slow"]
    if not slow:
        return
    r0 = slow[0]
    add(f"### Slow readers ({r0['clients']:,} clients, {r0['rate']:g} events/s)")
    add("")
    add(
        "| server | phase | delivered ev/s | p50 ms | p99 ms | max ms | lost (99 %) | dup"
        " | server CPU % | RSS MB | slow readers cut off |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(slow, key=lambda r: (_order(r["server"]), r.get("slow_readers", 0) > 0)):
        add(
            f"| {r['server']} | {r.get('phase', '')} | {_fmt(r['delivered_eps'])}"
            f" | {_fmt(_lat(r, 'p50'), 1)} | {_fmt(_lat(r, 'p99'), 1)} | {_fmt(_lat(r, 'max'), 0)}"
            f" | {r['lost']} | {r['dup']} | {_fmt(r['server_cpu_pct'])}"
            f" | {_fmt(r['server_rss_mb'], 1)}"
            f" | {r.get('slow_cut_off_by_server', '-')} |"
        )
    add("")


# -- charts ------------------------------------------------------------------

COLORS = {"ssefan": "tab:blue", "nchan": "tab:green", "starlette": "tab:orange", "naive": "tab:red"}


def write_charts(out: Path, records: list[Record]) -> list[Path]:
    fan = [r for r in records if r["scenario"] == "fanout"]
    if not fan:
        return []
    try:
        import matplotlib
    except ImportError:  # a bench-only dependency; CI's smoke run goes without
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    servers = _servers(fan)
    rates = sorted({r["rate"] for r in fan})
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4.2), squeeze=False)
    for ax, rate in zip(axes[0], rates, strict=True):
        for server in servers:
            points = sorted(
                (r["clients"], _lat(r, "p50"), _lat(r, "p99"))
                for r in fan
                if r["server"] == server and r["rate"] == rate
            )
            points = [p for p in points if p[1] is not None and p[2] is not None]
            if not points:
                continue
            xs = [p[0] for p in points]
            color = COLORS.get(server)
            ax.plot(xs, [p[2] for p in points], "o-", color=color, label=f"{server} p99")
            ax.plot(
                xs, [p[1] for p in points], "x--", color=color, alpha=0.6, label=f"{server} p50"
            )
        ax.set_title(f"{rate:g} events/s, {fan[0]['payload']} B payload")
        ax.set_xlabel("clients")
        ax.set_ylabel("publish -> receive latency (ms)")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Latency vs clients")
    fig.tight_layout()
    path = out / "latency_vs_clients.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for server in servers:
        mine = [r for r in fan if r["server"] == server]
        xs = [float(r["server_cpu_pct"]) for r in mine]
        ys = [float(r["delivered_eps"]) for r in mine]
        ax.scatter(xs, ys, color=COLORS.get(server), label=server, s=30)
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(
                f"{r['clients'] // 1000}kx{r['rate']:g}",
                (x, y),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xlabel("server CPU (% of one core)")
    ax.set_ylabel("delivered events/s (all clients)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Delivered events/s vs server CPU (labels: clients x events/s)")
    fig.tight_layout()
    path = out / "eps_vs_cpu.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
