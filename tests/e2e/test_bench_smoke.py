"""The load benchmark's smoke scenario, so `python -m bench run` never rots.

Runs `python -m bench run --smoke` (ssefan only, about 50 clients, a few
seconds, loopback) in a subprocess and checks the JSON report: complete, zero
loss, and exactly one upstream connection however many clients there are.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

RECORD_KEYS = {
    "scenario",
    "server",
    "clients",
    "connected",
    "rate",
    "payload",
    "seconds",
    "published_eps",
    "delivered_eps",
    "events",
    "lost",
    "dup",
    "ooo",
    "behind_at_end",
    "disconnects",
    "latency_ms",
    "server_cpu_pct",
    "server_rss_mb",
    "rss_before_mb",
    "rss_per_conn_kb",
    "upstream_connections",
    "upstream_peak_connections",
    "upstream_cpu_pct",
    "clients_cpu_pct",
}


@pytest.mark.slow
def test_smoke_run_reports_zero_loss_and_one_upstream_connection(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    assert json.loads((out / "fanout.json").read_text())["records"] == report["records"]
    assert "| ssefan |" in (out / "table.md").read_text()
    meta = report["meta"]
    assert meta["machine"]["nproc"] >= 1 and meta["machine"]["python"]
    assert meta["command"].startswith("python -m bench run --smoke")

    records = report["records"]
    assert records, "the smoke run measured nothing"
    for record in records:
        assert record.keys() >= RECORD_KEYS, RECORD_KEYS - record.keys()
        assert record["server"] == "ssefan"
        assert record["connected"] == record["clients"] >= 50
        assert record["published_eps"] > 0
        assert record["delivered_eps"] > 0
        # Every client got every event exactly once, in order, and caught up.
        assert (record["lost"], record["dup"], record["ooo"]) == (0, 0, 0), record
        assert record["behind_at_end"] == 0, record
        assert record["disconnects"] == 0, record
        # One upstream subscription, whatever the number of clients.
        assert record["upstream_connections"] == 1
        assert record["upstream_peak_connections"] == 1
        latency = record["latency_ms"]
        assert latency["samples"] > 0
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"]
        assert all(math.isfinite(latency[k]) for k in ("p50", "p99", "max"))
        assert record["server_rss_mb"] > 0 and record["server_cpu_pct"] >= 0

    upstream_target = next(t for t in report["targets"] if "upstream connection" in t["target"])
    assert upstream_target["met"] is True


@pytest.mark.slow
def test_smoke_keyed_run_has_one_upstream_connection_per_key(tmp_path: Path) -> None:
    """5 keys x 2 clients on ssefan's template route, then one static route."""
    out = tmp_path / "results"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "run",
            "--smoke",
            "--scenarios",
            "keyed",
            "--duration",
            "1.5",
            "--warmup",
            "0.5",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((out / "results.json").read_text())
    records = {r["phase"]: r for r in report["records"]}
    assert set(records) == {"keyed", "static"}
    keyed, static = records["keyed"], records["static"]
    assert (keyed["keys"], keyed["clients_per_key"], keyed["clients"]) == (5, 2, 10)
    assert (static["keys"], static["clients"]) == (0, 10)
    for record in (keyed, static):
        assert record.keys() >= RECORD_KEYS | {"cpu_us_per_delivery"}, RECORD_KEYS - record.keys()
        assert record["connected"] == record["clients"]
        assert record["delivered_eps"] > 0 and record["cpu_us_per_delivery"] > 0
        # Each client got its own key's events, all of them, once, in order.
        assert (record["lost"], record["dup"], record["ooo"], record["wrong_key"]) == (0, 0, 0, 0)
        assert record["behind_at_end"] == 0 and record["disconnects"] == 0
    # The upstream publishes R events/s on each key.
    assert keyed["published_eps"] > 4 * static["published_eps"]
    # One upstream subscription per key: every key had one, none had two.
    per_key = keyed["upstream_per_key"]
    assert per_key["keys_open"] == per_key["keys_accepted"] == 5
    assert per_key["max_peak_streams"] == 1
    assert per_key["keys_accepted_more_than_once"] == 0
    assert per_key["publishing_keys_without_stream"] == 0
    assert keyed["upstream_peak_connections"] == 5
    assert static["upstream_peak_connections"] == 1
    assert keyed["cpu_per_delivery_vs_static"] > 0
    targets = {t["target"].split(",")[0]: t for t in report["targets"]}
    assert targets["exactly one upstream connection per live key"]["met"] is True
    assert "Template routes: keyed fan-out" in (out / "table.md").read_text()
