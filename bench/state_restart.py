"""Restart cost of `state_dir`: a full ring's snapshot at stop, its restore at start.

    python -m bench.state_restart [--events 90000] [--payload 200] [--buffer-bytes 16MiB]

A synthetic app streams `--events` events with integer ids at once; ssefan
(one route, `buffer_bytes` as given) fills its ring, is stopped with SIGTERM
and started again, with and without `state_dir`, in one run. Reported: the
snapshot's size, how long the stop took (the snapshot is written in it), the
time from exec to "listening" on the restart, and how many events were
restored. Loopback only; every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"


class BurstApp:
    """An SSE app that sends events 1..n at once, after Last-Event-ID if given."""

    def __init__(self, events: int, payload: int) -> None:
        self.events = events
        self.pad = "x" * max(0, payload - 20)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> BurstApp:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            last = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"last-event-id:"):
                    last = int(line.split(b":", 1)[1])
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n")
            n = last + 1
            while n <= self.events:
                stop = min(n + 1000, self.events + 1)
                writer.write(
                    "".join(f"id: {i}\ndata: {i} {self.pad}\n\n" for i in range(n, stop)).encode()
                )
                n = stop
                await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def start(config: Path) -> tuple[subprocess.Popen[str], float, str]:
    """ssefan on `config`: the process, seconds to "listening", the restore line if any."""
    began = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssefan", "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        text=True,
    )
    restored = ""
    assert proc.stderr is not None
    for line in proc.stderr:
        if "restored" in line:
            restored = line.strip()
        if "ssefan listening on" in line:
            return proc, time.monotonic() - began, restored
    raise RuntimeError(f"ssefan exited ({proc.wait()}) before listening")


def stop(proc: subprocess.Popen[str]) -> float:
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    return time.monotonic() - began


def measure(
    app: BurstApp, workdir: Path, buffer_bytes: str, state: bool, fill: float
) -> dict[str, object]:
    state_dir = workdir / ("state" if state else "none")
    state_dir.mkdir()
    config = workdir / f"ssefan-{'state' if state else 'none'}.yaml"
    lines = [
        f"listen: {HOST}:0",
        "drain_window: 0s",
        "shutdown_timeout: 20s",
        *([f"state_dir: {state_dir}"] if state else []),
        "routes:",
        "  - path: /e",
        f"    upstream: http://{HOST}:{app.port}/e",
        "    buffer: 1000000",
        f"    buffer_bytes: {buffer_bytes}",
    ]
    config.write_text("\n".join(lines) + "\n")
    proc, _, _ = start(config)
    time.sleep(fill)  # the burst fills the ring (the app sends everything at once)
    stop_seconds = stop(proc)
    snapshot = sum(p.stat().st_size for p in state_dir.glob("*.snap"))
    proc, to_listening, restored = start(config)
    stop(proc)
    return {
        "state_dir": state,
        "stop_s": round(stop_seconds, 3),
        "restart_to_listening_s": round(to_listening, 3),
        "snapshot_bytes": snapshot,
        "restored": restored.split('msg="', 1)[-1].rstrip('"') if restored else "",
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.state_restart", description=__doc__)
    parser.add_argument("--events", type=int, default=90_000)
    parser.add_argument("--payload", type=int, default=200)
    parser.add_argument("--buffer-bytes", default="16MiB")
    parser.add_argument("--fill", type=float, default=4.0, help="seconds to fill the ring")
    args = parser.parse_args()
    app = BurstApp(args.events, args.payload).start()
    try:
        with tempfile.TemporaryDirectory(prefix="ssefan-state-bench-") as tmp:
            rows = [
                measure(app, Path(tmp), args.buffer_bytes, state, args.fill)
                for state in (False, True)
            ]
    finally:
        app.stop()
    print(
        f"# {platform.processor() or platform.machine()}, Python {platform.python_version()},"
        f" command: python -m bench.state_restart --events {args.events}"
        f" --payload {args.payload} --buffer-bytes {args.buffer_bytes}"
    )
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
