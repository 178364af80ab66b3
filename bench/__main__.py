"""`python -m bench run`: the ssefan load benchmark, side by side with baselines.

See bench/README.md. Everything runs on 127.0.0.1, every phase is bounded in
time and client count, and every process started is stopped before exit.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .clients import LOWAT_NOTE
from .common import plan_cpus, raise_nofile
from .report import machine_info, targets, write_charts, write_json, write_markdown
from .scenarios import (
    KEYED_SERVERS,
    Options,
    run_fanout,
    run_idle,
    run_keyed,
    run_keyed_churn,
    run_keyed_idle,
    run_slow,
    run_storm,
)
from .servers import DEFAULT_SERVERS, SERVER_KINDS, ensure_nchan

BENCH = Path(__file__).resolve().parent
SCENARIOS = ("fanout", "idle", "storm", "slow", "keyed", "keyed-idle", "keyed-churn")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; expected some of {','.join(allowed)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run scenarios and write the report")
    run.add_argument(
        "--scenarios",
        type=_names(SCENARIOS),
        help=f"{','.join(SCENARIOS)} (all; --smoke: fanout)",
    )
    run.add_argument(
        "--servers",
        type=_names(SERVER_KINDS),
        default=list(DEFAULT_SERVERS),
        help=f"%(default)s; also: {', '.join(k for k in SERVER_KINDS if k not in DEFAULT_SERVERS)}",
    )
    run.add_argument("--quick", action="store_true", help="fewer points, shorter windows")
    run.add_argument(
        "--smoke", action="store_true", help="CI: ssefan only, 50 clients, a few seconds"
    )
    run.add_argument("--clients", type=_ints, help="fan-out client counts (1000,5000,10000)")
    run.add_argument("--rates", type=_floats, help="fan-out events/s (1,10,100)")
    run.add_argument("--idle-clients", type=_ints, help="idle stream counts (10000,20000)")
    run.add_argument("--storm-clients", type=int, help="reconnect storm clients (5000)")
    run.add_argument("--slow-clients", type=int, help="slow-reader scenario clients (5000)")
    run.add_argument("--keys", type=int, help="keyed fan-out: keys on the template route (1000)")
    run.add_argument("--clients-per-key", type=int, help="keyed fan-out and churn (10)")
    run.add_argument("--key-rate", type=float, help="keyed and churn: events/s per key (10)")
    run.add_argument("--idle-keys", type=int, help="keyed-idle: keys, one idle client each (10000)")
    run.add_argument("--churn-keys", type=int, help="keyed-churn: keys of measured streams (100)")
    run.add_argument("--churn-rate", type=float, help="keyed-churn: new keys opened per s (500)")
    run.add_argument("--naive-max-clients", type=int, default=10_000, help="%(default)s")
    run.add_argument("--duration", type=float, help="measured window seconds (8)")
    run.add_argument("--warmup", type=float, help="seconds at rate before a window (2)")
    run.add_argument("--payload", type=int, default=200, help="event data bytes (%(default)s)")
    run.add_argument("--workers", type=int, help="client processes (2)")
    run.add_argument("--out", type=Path, help="results directory (bench/results/<time>)")
    run.add_argument(
        "--publish", action="store_true", help="copy table, charts and JSON to bench/latest/"
    )
    run.add_argument("--no-install", action="store_true", help="never apt-get install nginx/nchan")
    run.add_argument(
        "--profile", action="store_true", help="py-spy the ssefan process in each window"
    )
    run.add_argument(
        "--no-lowat",
        action="store_true",
        help="clients read every event as it arrives (no SO_RCVLOWAT batching)",
    )
    return parser


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario sizes: full defaults, --quick or --smoke, then explicit flags win."""
    if args.smoke:
        plan: dict[str, Any] = {
            "clients": [50],
            "rates": [20.0],
            "idle": [50],
            "storm": 50,
            "slow": 200,
            "keys": 5,
            "clients_per_key": 2,
            "key_rate": 20.0,
            "idle_keys": 20,
            "churn_keys": 2,
            "churn_rate": 20.0,
            "duration": 3.0,
            "warmup": 1.0,
            "workers": 1,
        }
    elif args.quick:
        plan = {
            "clients": [1000, 5000],
            "rates": [10.0, 100.0],
            "idle": [5000],
            "storm": 2000,
            "slow": 2000,
            "keys": 500,
            "clients_per_key": 10,
            "key_rate": 10.0,
            "idle_keys": 5000,
            "churn_keys": 100,
            "churn_rate": 500.0,
            "duration": 4.0,
            "warmup": 1.0,
            "workers": 2,
        }
    else:
        plan = {
            "clients": [1000, 5000, 10_000],
            "rates": [1.0, 10.0, 100.0],
            "idle": [10_000, 20_000],
            "storm": 5000,
            "slow": 5000,
            "keys": 1000,
            "clients_per_key": 10,
            "key_rate": 10.0,
            "idle_keys": 10_000,
            "churn_keys": 100,
            "churn_rate": 500.0,
            "duration": 8.0,
            "warmup": 2.0,
            "workers": 2,
        }
    overrides = {
        "clients": args.clients,
        "rates": args.rates,
        "idle": args.idle_clients,
        "storm": args.storm_clients,
        "slow": args.slow_clients,
        "keys": args.keys,
        "clients_per_key": args.clients_per_key,
        "key_rate": args.key_rate,
        "idle_keys": args.idle_keys,
        "churn_keys": args.churn_keys,
        "churn_rate": args.churn_rate,
        "duration": args.duration,
        "warmup": args.warmup,
        "workers": args.workers,
    }
    plan.update({k: v for k, v in overrides.items() if v is not None})
    return plan


def _log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def _describe(record: dict[str, Any]) -> str:
    lat = record.get("latency_ms") or {}
    parts = [
        f"{record['scenario']} {record['server']} n={record['clients']} r={record['rate']:g}",
        record.get("phase", ""),
    ]
    if record.get("keys"):
        parts.append(f"keys={record['keys']}x{record['clients_per_key']}")
    if "delivered_eps" in record:
        parts.append(
            f"{record['delivered_eps']:,.0f} ev/s p50={lat.get('p50')} p99={lat.get('p99')}"
            f" lost={record.get('lost')} dup={record.get('dup')}"
            f" behind={record.get('behind_at_end', 0)}"
            f" cpu/delivery={record.get('cpu_us_per_delivery')}us"
        )
    if "upstream_per_key" in record:
        per_key = record["upstream_per_key"]
        parts.append(
            f"upstream/key max={per_key['max_peak_streams']}"
            f" keys_open={per_key['keys_open']}"
            f" reopened={per_key['keys_accepted_more_than_once']}"
        )
    if "rss_per_idle_channel_kb" in record:
        parts.append(f"rss/idle channel={record['rss_per_idle_channel_kb']} KiB")
    if "churn" in record:
        churn = record["churn"]
        parts.append(
            f"churn opened={churn['opened']} ssefan_opened={churn['ssefan_channels_opened']}"
            f" closed={churn['ssefan_channels_closed']}"
            f" upstream_opened={churn['upstream_connections_opened']}"
            f" errors={churn['errors']}"
        )
    parts.append(
        f"cpu={record['server_cpu_pct']}% rss={record['server_rss_mb']}MB"
        f" ({record['rss_per_conn_kb']} KiB/conn) upstream_conns={record['upstream_connections']}"
        f" clients_cpu={record.get('clients_cpu_pct')}% load_busy={record['load_cpus_busy_pct']}%"
    )
    return " ".join(p for p in parts if p)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    nofile = raise_nofile()
    cpu_plan = plan_cpus()
    if cpu_plan.load:
        os.sched_setaffinity(0, cpu_plan.load)  # children (client workers) inherit it
    plan = _plan(args)
    scenarios: list[str] = args.scenarios or (["fanout"] if args.smoke else list(SCENARIOS))
    servers: list[str] = ["ssefan"] if args.smoke else args.servers
    started = datetime.datetime.now()
    out: Path = args.out or BENCH / "results" / started.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    opts = Options(
        workdir=out / "work",
        plan=cpu_plan,
        nofile=nofile[1],
        payload=args.payload,
        workers=plan["workers"],
        warmup=plan["warmup"],
        duration=plan["duration"],
        profile=args.profile,
        lowat=not args.no_lowat,
    )
    if args.smoke or args.quick:
        opts.idle_settle = 1.0 if args.smoke else 2.0
        opts.drain_timeout = 5.0
        opts.slow_settle = 5.0
        opts.storm_timeout = 30.0
        opts.quiet_wait = 0.0 if args.smoke else 10.0
    opts.workdir.mkdir(parents=True, exist_ok=True)
    notes = opts.notes
    notes.append(cpu_plan.note)
    if opts.lowat:
        notes.append(f"sessions of 1000+ clients: {LOWAT_NOTE} (--no-lowat turns it off)")
    if nofile[1] < 20_100:
        notes.append(
            f"RLIMIT_NOFILE hard limit is {nofile[1]}: one process can hold at most about"
            f" {nofile[1] - 100} streams"
        )
    if "nchan" in servers:
        ok, note = ensure_nchan(allow_install=not args.no_install)
        notes.append(f"nchan: {note}")
        if not ok:
            servers = [s for s in servers if s != "nchan"]
    if "naive" in servers and "fanout" in scenarios:
        cap = args.naive_max_clients
        if any(n > cap for n in plan["clients"]):
            notes.append(f"naive baseline capped at {cap:,} clients (--naive-max-clients)")
    keyed_servers = [s for s in servers if s in KEYED_SERVERS]
    if any(s.startswith("keyed") for s in scenarios):
        skipped = [s for s in servers if s not in KEYED_SERVERS]
        if skipped:
            notes.append(
                f"template-route scenarios skip {', '.join(skipped)} (no per-key channels);"
                " keyed-churn runs ssefan only (it reads ssefan's channel metrics)"
            )
    command = "python -m bench " + shlex.join(argv)
    meta: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": command,
        "machine": machine_info(nofile),
        "pinning": cpu_plan.note,
        "plan": plan,
        "notes": notes,
        "servers": servers,
        "scenarios": scenarios,
    }
    records: list[dict[str, Any]] = []
    failures = 0

    def attempt(what: str, action: Callable[[], list[dict[str, Any]]]) -> None:
        nonlocal failures
        _log(f"{what} ...")
        t0 = time.monotonic()
        try:
            new = action()
        except Exception as exc:
            failures += 1
            notes.append(f"{what} failed: {type(exc).__name__}: {exc}")
            _log(f"{what} FAILED:\n{traceback.format_exc()}")
            return
        for record in new:
            _log("  " + _describe(record))
        records.extend(new)
        _log(f"{what} done in {time.monotonic() - t0:.0f}s")
        _write(out, meta, records)

    for scenario in scenarios:
        if scenario == "fanout":
            for n in plan["clients"]:
                for kind in servers:
                    if kind == "naive" and n > args.naive_max_clients:
                        continue
                    attempt(
                        f"fanout {kind} {n} clients",
                        functools.partial(run_fanout, opts, kind, n, plan["rates"]),
                    )
        elif scenario == "idle":
            for n in plan["idle"]:
                for kind in servers:
                    attempt(f"idle {kind} {n}", functools.partial(run_idle, opts, kind, n))
        elif scenario == "storm":
            for kind in servers:
                attempt(
                    f"storm {kind} {plan['storm']}",
                    functools.partial(run_storm, opts, kind, plan["storm"]),
                )
        elif scenario == "slow":
            for kind in servers:
                attempt(
                    f"slow {kind} {plan['slow']}",
                    functools.partial(run_slow, opts, kind, plan["slow"]),
                )
        elif scenario == "keyed":
            for kind in keyed_servers:
                attempt(
                    f"keyed {kind} {plan['keys']} keys x {plan['clients_per_key']}",
                    functools.partial(
                        run_keyed,
                        opts,
                        kind,
                        plan["keys"],
                        plan["clients_per_key"],
                        plan["key_rate"],
                    ),
                )
        elif scenario == "keyed-idle":
            for kind in keyed_servers:
                attempt(
                    f"keyed-idle {kind} {plan['idle_keys']} keys",
                    functools.partial(run_keyed_idle, opts, kind, plan["idle_keys"]),
                )
        elif scenario == "keyed-churn" and "ssefan" in servers:
            attempt(
                f"keyed-churn ssefan {plan['churn_rate']:g} keys/s",
                functools.partial(
                    run_keyed_churn,
                    opts,
                    "ssefan",
                    plan["churn_keys"],
                    plan["clients_per_key"],
                    plan["key_rate"],
                    plan["churn_rate"],
                ),
            )
    meta["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    meta["elapsed_seconds"] = round((datetime.datetime.now() - started).total_seconds())
    report = _write(out, meta, records)
    charts = write_charts(out, records)
    if not charts and any(r["scenario"] == "fanout" for r in records):
        notes.append("no charts: matplotlib is not installed (see bench/requirements.txt)")
    text = write_markdown(out, report)
    print(text)
    _log(f"results in {out}")
    if args.publish:
        latest = BENCH / "latest"
        latest.mkdir(exist_ok=True)
        for path in [out / "table.md", out / "results.json", *charts]:
            shutil.copy2(path, latest / path.name)
        _log(f"published to {latest}")
    return 1 if failures else 0


def _write(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    report = {"meta": meta, "records": records, "targets": targets(records)}
    write_json(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args, argv)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
