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
SERVER_ORDER = ("ssefan", "ssefan-state", "nchan", "starlette", "naive")


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
    # Static routes only: a template route has one upstream per key (below).
    ours = [r for r in records if r["server"] == "ssefan" and not r.get("keys")]
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
    out.extend(_fanout_vs_nchan_target(fan))
    out.extend(_keyed_targets(records))
    out.extend(_state_dir_target(fan))
    return out


def _state_dir_target(fan: list[Record]) -> list[dict[str, Any]]:
    """Issue 13: journaling every ring (state_dir) costs <= 1.05x CPU per delivery."""
    rows = []
    for s in fan:
        if s.get("server") != "ssefan":
            continue
        j = _find(fan, server="ssefan-state", clients=s.get("clients"), rate=s.get("rate"))
        sc = s.get("cpu_us_per_delivery")
        jc = j.get("cpu_us_per_delivery") if j is not None else None
        if not sc or jc is None:
            continue
        ratio = jc / sc
        rows.append(
            {
                "target": f"state_dir on, {s['clients']:,} clients x {s['rate']:g}/s:"
                " CPU per delivery <= 1.05x without",
                "ssefan": f"{_fmt(jc, 2)} us/delivery with state_dir, {_fmt(sc, 2)} without",
                "nchan": "-",
                "ratio": ratio,
                "met": ratio <= 1.05,
            }
        )
    return rows


def _fanout_vs_nchan_target(fan: list[Record]) -> list[dict[str, Any]]:
    """Issue 12: at 1000 clients x 100/s, ssefan's p99 and CPU per delivery <= nchan's."""
    s = _find(fan, server="ssefan", clients=1000, rate=100.0)
    n = _find(fan, server="nchan", clients=1000, rate=100.0)
    if s is None or n is None:
        return []
    sp, np_ = _lat(s, "p99"), _lat(n, "p99")
    sc, nc = s.get("cpu_us_per_delivery"), n.get("cpu_us_per_delivery")
    p99_ratio = sp / np_ if sp is not None and np_ else None
    cpu_ratio = sc / nc if sc is not None and nc else None
    return [
        {
            "target": "1,000 clients x 100/s: p99 and CPU per delivery <= nchan"
            " (ratio: the larger of the two)",
            "ssefan": f"p99 {_fmt(sp, 1)} ms, {_fmt(sc, 2)} us/delivery",
            "nchan": f"p99 {_fmt(np_, 1)} ms, {_fmt(nc, 2)} us/delivery",
            "ratio": max(p99_ratio or 0.0, cpu_ratio or 0.0) or None,
            "met": p99_ratio is not None
            and cpu_ratio is not None
            and p99_ratio <= 1
            and cpu_ratio <= 1,
        }
    ]


def _keyed_targets(records: list[Record]) -> list[dict[str, Any]]:
    """Issue 12's template-route targets (ratio column: the larger of the two)."""
    out: list[dict[str, Any]] = []
    keyed = [r for r in records if r["scenario"] == "keyed"]
    k = _find(keyed, server="ssefan", phase="keyed")
    st = _find(keyed, server="ssefan", phase="static")
    nk = _find(keyed, server="nchan", phase="keyed")
    if k is not None and st is not None:
        ratio = k.get("cpu_per_delivery_vs_static")
        out.append(
            {
                "target": f"CPU per delivery, {k['keys']:,} keys x {k['clients_per_key']}"
                f" / one static route ({st['clients']:,} clients), {k['rate']:g}/s <= 1.3x",
                "ssefan": f"{_fmt(k.get('cpu_us_per_delivery'), 2)} vs"
                f" {_fmt(st.get('cpu_us_per_delivery'), 2)} us/delivery",
                "nchan": f"keyed: {_fmt(nk.get('cpu_us_per_delivery'), 2)} us/delivery"
                if nk
                else "not run",
                "ratio": ratio,
                "met": ratio is not None and ratio <= 1.3,
            }
        )
    idle = [r for r in records if r["scenario"] == "keyed-idle" and r.get("phase") == "keyed"]
    si = _find(idle, server="ssefan")
    ni = _find(idle, server="nchan")
    if si is not None:
        kb = si["rss_per_idle_channel_kb"]
        out.append(
            {
                "target": f"RSS per idle channel at {si['keys']:,} keys"
                " (minus as many idle clients on one static route) <= 16 KiB",
                "ssefan": f"{kb:.2f} KiB",
                "nchan": f"{ni['rss_per_idle_channel_kb']:.2f} KiB" if ni else "not run",
                "ratio": kb / 16,
                "met": kb <= 16,
            }
        )
    ours = [r for r in records if r["server"] == "ssefan" and r.get("keys")]
    if ours:
        per_key = [r["upstream_per_key"] for r in ours]
        peak = max(p["max_peak_streams"] for p in per_key)
        missing = max(p["publishing_keys_without_stream"] for p in per_key)
        reopened = max(p["keys_accepted_more_than_once"] for p in per_key)
        churn = [r["churn"] for r in ours if "churn" in r]
        churn_ok = all(
            c["upstream_connections_opened"] == c["ssefan_channels_opened"] for c in churn
        )
        churn_text = "".join(
            f"; churn: {c['upstream_connections_opened']} upstream connections for"
            f" {c['ssefan_channels_opened']} keys opened"
            for c in churn
        )
        out.append(
            {
                "target": "exactly one upstream connection per live key",
                "ssefan": f"peak per key {peak}, live keys without one {missing},"
                f" keys subscribed twice {reopened}{churn_text}",
                "nchan": "publisher: 1 connection (push model)",
                "ratio": None,
                "met": peak == 1 and missing == 0 and reopened == 0 and churn_ok,
            }
        )
        lossy = [r for r in ours if "lost" in r]
        bad = sum(r["lost"] + r["dup"] + r["ooo"] + r.get("wrong_key", 0) for r in lossy)
        behind = sum(r.get("behind_at_end", 0) for r in lossy)
        if lossy:
            out.append(
                {
                    "target": "template routes: zero loss (lost + dup + ooo + other key's events)",
                    "ssefan": f"{bad} over {len(lossy)} windows, {behind} behind at end",
                    "nchan": _keyed_loss(records, "nchan"),
                    "ratio": None,
                    "met": bad == 0 and behind == 0,
                }
            )
    with_churn = _find(records, scenario="keyed-churn", phase="with churn")
    without = _find(records, scenario="keyed-churn", phase="without churn")
    if with_churn is not None and without is not None:
        c = with_churn["churn"]
        out.append(
            {
                "target": f"opening keys at {c['rate']:g}/s does not hold up existing streams"
                " (p99 with churn / without; no numeric target)",
                "ssefan": f"{_fmt(_lat(with_churn, 'p99'), 1)} vs"
                f" {_fmt(_lat(without, 'p99'), 1)} ms",
                "nchan": "not run",
                "ratio": with_churn.get("p99_vs_without_churn"),
                "met": None,
            }
        )
    return out


def _keyed_loss(records: list[Record], server: str) -> str:
    mine = [r for r in records if r["server"] == server and r.get("keys") and "lost" in r]
    if not mine:
        return "not run"
    bad = sum(r["lost"] + r["dup"] + r["ooo"] + r.get("wrong_key", 0) for r in mine)
    behind = sum(r.get("behind_at_end", 0) for r in mine)
    return f"{bad} over {len(mine)} windows, {behind} behind at end"


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
    _keyed_table(records, add)
    _keyed_idle_table(records, add)
    _churn_table(records, add)
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
        " | p99 ms | max ms | server CPU % | CPU us/delivery | server core busy % (softirq)"
        " | RSS MB | RSS/conn KiB | upstream conns | upstream CPU % | clients CPU %"
        " | load core busy % | other procs CPU % |"
    )
    add("|---" * 21 + "|")
    for r in sorted(fan, key=lambda r: (r["clients"], r["rate"], _order(r["server"]))):
        add(
            f"| {r['server']} | {r['clients']:,} | {r['rate']:g} | {_fmt(r['delivered_eps'])}"
            f" | {r['lost']} | {r['dup']} | {r['ooo']} | {r.get('behind_at_end', 0)}"
            f" | {_fmt(_lat(r, 'p50'), 1)} | {_fmt(_lat(r, 'p99'), 1)}"
            f" | {_fmt(_lat(r, 'max'), 0)} | {_fmt(r['server_cpu_pct'])}"
            f" | {_fmt(r.get('cpu_us_per_delivery'), 2)}"
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


def _per_key(r: Record) -> str:
    """Upstream connections per key: the most any key had / keys that had none."""
    if r["server"] == "nchan":
        return "0 (+1 publisher)"
    per_key = r.get("upstream_per_key")
    if not per_key:
        return _upstream_conns(r)
    return (
        f"{per_key['max_peak_streams']} max, {per_key['publishing_keys_without_stream']} keys"
        f" without, {per_key['keys_accepted_more_than_once']} twice"
    )


def _layout(r: Record) -> str:
    if r.get("keys"):
        return f"{r['keys']:,} keys x {r['clients_per_key']}"
    return f"one static route x {r['clients']:,}"


def _keyed_table(records: list[Record], add: Any) -> None:
    keyed = [r for r in records if r["scenario"] == "keyed"]
    if not keyed:
        return
    r0 = keyed[0]
    add(
        f"### Template routes: keyed fan-out ({r0['rate']:g} events/s per key) and one static"
        " route with the same deliveries"
    )
    add("")
    add(
        "| server | layout | delivered ev/s | upstream ev/s | lost | dup | ooo | other key"
        " | behind | p50 ms | p99 ms | max ms | server CPU % | CPU us/delivery"
        " | vs static | RSS MB | upstream connections per key | upstream CPU % |"
    )
    add("|---" * 18 + "|")
    for r in sorted(keyed, key=lambda r: (_order(r["server"]), r.get("phase") != "keyed")):
        add(
            f"| {r['server']} | {_layout(r)} | {_fmt(r['delivered_eps'])}"
            f" | {_fmt(r['published_eps'])} | {r['lost']} | {r['dup']} | {r['ooo']}"
            f" | {r.get('wrong_key', 0)} | {r.get('behind_at_end', 0)}"
            f" | {_fmt(_lat(r, 'p50'), 1)} | {_fmt(_lat(r, 'p99'), 1)} | {_fmt(_lat(r, 'max'), 0)}"
            f" | {_fmt(r['server_cpu_pct'])} | {_fmt(r.get('cpu_us_per_delivery'), 2)}"
            f" | {_fmt(r.get('cpu_per_delivery_vs_static'), 2)}"
            f" | {_fmt(r['server_rss_mb'], 1)} | {_per_key(r)} | {_fmt(r['upstream_cpu_pct'])} |"
        )
    add("")


def _keyed_idle_table(records: list[Record], add: Any) -> None:
    idle = [r for r in records if r["scenario"] == "keyed-idle"]
    if not idle:
        return
    add("### Template routes: idle channels (one idle client per key vs one static route)")
    add("")
    add(
        "| server | layout | RSS before MB | RSS after MB | grown MB | RSS/stream KiB"
        " | RSS per idle channel KiB | upstream connections per key |"
    )
    add("|---|---|---|---|---|---|---|---|")
    for r in sorted(idle, key=lambda r: (_order(r["server"]), r.get("phase") != "keyed")):
        grown = (r["server_rss_bytes"] - r["rss_before_bytes"]) / 2**20
        add(
            f"| {r['server']} | {_layout(r)} | {_fmt(r['rss_before_mb'], 1)}"
            f" | {_fmt(r['server_rss_mb'], 1)} | {_fmt(grown, 1)} | {_fmt(r['rss_per_conn_kb'], 2)}"
            f" | {_fmt(r.get('rss_per_idle_channel_kb'), 2)} | {_per_key(r)} |"
        )
    add("")


def _churn_table(records: list[Record], add: Any) -> None:
    churn = [r for r in records if r["scenario"] == "keyed-churn"]
    with_churn = _find(churn, phase="with churn")
    if not churn or with_churn is None:
        return
    c = with_churn["churn"]
    add(
        f"### Template routes: key churn ({_layout(with_churn)} at {with_churn['rate']:g}/s"
        f" measured; new keys at {c['rate']:g}/s, each client {c['dwell_s']:g} s,"
        f" linger {c['linger_s']:g} s)"
    )
    add("")
    add(
        "| phase | delivered ev/s | p50 ms | p99 ms | max ms | lost | dup | ooo | behind"
        " | server CPU % | CPU us/delivery | RSS MB |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(churn, key=lambda r: r.get("phase") == "with churn"):
        add(
            f"| {r.get('phase', '')} | {_fmt(r['delivered_eps'])} | {_fmt(_lat(r, 'p50'), 1)}"
            f" | {_fmt(_lat(r, 'p99'), 1)} | {_fmt(_lat(r, 'max'), 0)} | {r['lost']} | {r['dup']}"
            f" | {r['ooo']} | {r.get('behind_at_end', '-')} | {_fmt(r['server_cpu_pct'])}"
            f" | {_fmt(r.get('cpu_us_per_delivery'), 2)} | {_fmt(r['server_rss_mb'], 1)} |"
        )
    add("")
    head = c["head_ms"]
    closed = ", ".join(f"{k} {v}" for k, v in c["ssefan_channels_closed"].items()) or "0"
    errors = ", ".join(f"{k}: {v}" for k, v in c["errors"].items()) or "none"
    add("| churn | value |")
    add("|---|---|")
    add(
        f"| new keys opened by clients (per s) | {c['opened']:,} ({_fmt(c['opened_per_s'], 1)}/s"
        f" over {_fmt(c['seconds'], 1)} s; schedule late by <= {_fmt(c['max_late_ms'], 1)} ms) |"
    )
    add(f"| response heads 200 / errors | {c['heads']:,} / {errors} |")
    add(
        f"| time to response head ms p50 / p99 / max | {_fmt(head.get('p50'), 1)}"
        f" / {_fmt(head.get('p99'), 1)} / {_fmt(head.get('max'), 1)} |"
    )
    add(
        f"| ssefan channels opened / closed (reason) | {c['ssefan_channels_opened']:,} / {closed} |"
    )
    add(
        f"| upstream connections opened / keys opened | {c['upstream_connections_opened']:,}"
        f" / {c['upstream_keys_opened']:,} |"
    )
    add(
        f"| after linger: ssefan channels / upstream streams open | {c['ssefan_channels_at_end']}"
        f" / {c['upstream_open_at_end']} |"
    )
    add(
        "| keys subscribed upstream more than once (whole session) |"
        f" {c['upstream_per_key_at_end']['keys_accepted_more_than_once']} |"
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
