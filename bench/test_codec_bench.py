"""Microbenchmarks for the SSE codec (ssefan.sse): parser and encoder throughput.

Run:

    .venv/bin/python -m pytest bench/test_codec_bench.py --benchmark-only -p no:cacheprovider

Why this command:

* ``bench/`` is outside ``testpaths = ["tests"]``, so a plain ``pytest`` never
  collects it; name the file.
* pyproject's ``addopts`` passes ``--benchmark-skip``, which skips every test
  that uses the ``benchmark`` fixture. pytest-benchmark's ``--benchmark-only``
  overrides ``--benchmark-skip`` (its session turns ``skip`` off when ``only``
  is on), and it also skips anything that is not a benchmark.
* ``--benchmark-enable`` is not needed: it only undoes ``--benchmark-disable``
  (run benchmarks once, untimed), which nothing sets. Passing it is harmless.
* ``-p no:cacheprovider`` keeps the run from writing ``.pytest_cache``.

Each test reports its throughput in ``extra_info`` (shown with
``--benchmark-json=out.json``, or ``--benchmark-columns=...``) and in the test
summary via ``print`` when run with ``-s``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from ssefan.core.sse import Event, Parser, encode

CHUNK = 64 * 1024  # a typical socket read: what the upstream adapter feeds
EVENT_SIZE = 200  # bytes on the wire per event, a small JSON update
BODY_SIZE = 1024 * 1024


def _event_wire(n: int, eol: bytes) -> bytes:
    head = b"id: %d%bevent: update%bdata: " % (n, eol, eol)
    tail = eol + eol
    payload = json.dumps({"seq": n, "pad": ""}, separators=(",", ":")).encode()
    pad = EVENT_SIZE - len(head) - len(tail) - len(payload)
    payload = json.dumps({"seq": n, "pad": "x" * pad}, separators=(",", ":")).encode()
    wire = head + payload + tail
    assert len(wire) == EVENT_SIZE
    return wire


def _body(eol: bytes) -> tuple[list[bytes], int]:
    count = BODY_SIZE // EVENT_SIZE
    body = b"".join(_event_wire(n, eol) for n in range(count))
    return [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)], count


def _report(benchmark: Any, nbytes: int, items: int, unit: str) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["MB/s"] = round(nbytes / mean / 1e6, 1)
    benchmark.extra_info[f"{unit}/s"] = round(items / mean)
    print(f"\n{benchmark.name}: {nbytes / mean / 1e6:.1f} MB/s, {items / mean:,.0f} {unit}/s")


@pytest.mark.parametrize("eol", [pytest.param(b"\n", id="lf"), pytest.param(b"\r\n", id="crlf")])
def test_parser_throughput(benchmark: Any, eol: bytes) -> None:
    chunks, count = _body(eol)

    def parse_body() -> int:
        parser = Parser()
        n = 0
        for chunk in chunks:
            n += len(parser.feed(chunk))
        parser.close()
        return n

    assert benchmark(parse_body) == count
    _report(benchmark, sum(map(len, chunks)), count, "events")


def test_encoder_throughput(benchmark: Any) -> None:
    events = [
        Event(
            json.dumps({"seq": n, "pad": "x" * 120}, separators=(",", ":")),
            event="update",
            id=str(n),
        )
        for n in range(10_000)
    ]

    def encode_all() -> int:
        return sum(len(encode(event)) for event in events)

    nbytes = benchmark(encode_all)
    assert nbytes > 10_000 * 150
    _report(benchmark, nbytes, len(events), "events")
