"""state_dir in one process: a channel's ring written, then restored into a new one.

Real files in tmp_path; the channels are fed directly (no upstream), as the
other in-memory channel suites do. A "restart" is a new Persistence and a new
Channel on the same directory.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fake_transport import Client

from ssefan.config import RouteConfig, UpstreamConfig
from ssefan.core.persist import ChannelId, RingState
from ssefan.core.sse import Event
from ssefan.stream.channel import Channel
from ssefan.stream.persistence import Persistence
from ssefan.stream.state import StateDir, file_stem

ROUTE = RouteConfig(
    path="/events", upstream=UpstreamConfig(url="http://127.0.0.1:9/e"), heartbeat=3600.0
)


def process(loop: asyncio.AbstractEventLoop, state: Path) -> tuple[Persistence, Channel]:
    """One process's start: its persistence, and the route's channel restored."""
    persistence = Persistence(str(state), state_sync=1.0, worker=0, loop=loop)
    channel = Channel(ROUTE, loop=loop)
    persistence.attach(channel, ROUTE)
    return persistence, channel


def test_a_clean_stop_restores_the_ring_seqs_ids_and_resume_point(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    persistence, channel = process(loop, tmp_path)
    channel.publish([Event("one", id="a1"), Event("two"), Event("three", id="a3")])
    assigned = channel.ring.id_at(1)  # "two" had no app id: ssefan gave it one
    assert assigned.startswith(channel.intake.id_prefix)
    saved = loop.run_until_complete(persistence.save_all(within=5.0))
    assert saved == 1
    stem = file_stem(ChannelId("/events", "", 0))
    assert (tmp_path / f"{stem}.snap").exists() and not (tmp_path / f"{stem}.journal").exists()

    _, again = process(loop, tmp_path)
    ring = again.ring
    assert (ring.first_seq, ring.next_seq) == (0, 3)
    assert [ring.id_at(s) for s in range(3)] == ["a1", assigned, "a3"]
    assert again.upstream_last_id == "a3"
    assert again.intake.id_prefix == channel.intake.id_prefix  # ids go on as they were
    # A client holding the assigned id resumes exactly after it.
    client = Client(again)
    again.subscribe(client.sub, assigned)
    assert [e.data for e in client.decoded().events] == ["three"]


def test_after_a_crash_the_journal_restores_what_was_flushed_under_a_new_prefix(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    persistence, channel = process(loop, tmp_path)
    channel.publish([Event("kept", id="1"), Event("kept too")])
    persistence.flush()  # what every state_sync does: one write()
    channel.publish([Event("lost", id="3")])  # appended, never written: SIGKILL loses it
    old_prefix = channel.intake.id_prefix

    _, again = process(loop, tmp_path)  # no save_all: the process died
    ring = again.ring
    assert [ring.id_at(s) for s in range(ring.first_seq, ring.next_seq)] == [
        "1",
        f"{old_prefix}1",
    ]
    assert again.upstream_last_id == "1"  # the upstream resumes after the last written id
    # Ids of the old prefix may have gone out after the last write: new ones differ.
    assert again.intake.id_prefix != old_prefix


def test_a_freed_channels_files_go_unless_the_process_is_stopping(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    persistence, channel = process(loop, tmp_path)
    channel.publish([Event("x", id="1")])
    persistence.flush()
    assert list(tmp_path.iterdir())
    persistence.forget(channel)
    assert not list(tmp_path.iterdir()) and channel.recorder is None

    persistence, channel = process(loop, tmp_path)
    channel.publish([Event("y", id="2")])
    loop.run_until_complete(persistence.save_all(within=5.0))
    persistence.forget(channel)  # closing at stop: the final snapshot stays
    assert [p.suffix for p in tmp_path.iterdir()] == [".snap"]


def test_a_damaged_snapshot_is_moved_aside_and_the_channel_starts_empty(
    loop: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    persistence, channel = process(loop, tmp_path)
    channel.publish([Event("x", id="1")])
    loop.run_until_complete(persistence.save_all(within=5.0))
    snapshot = tmp_path / f"{file_stem(ChannelId('/events', '', 0))}.snap"
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))

    _, again = process(loop, tmp_path)
    assert len(again.ring) == 0 and again.upstream_last_id == ""
    assert any(p.name.endswith(".bad") for p in tmp_path.iterdir())
    again.publish([Event("fresh", id="9")])  # and it journals again
    assert again.ring.id_at(0) == "9"


class SlowRotation:
    """The disk a rotation writes to is slow: its snapshot takes 0.3 s."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = StateDir.save_snapshot

        def slow(directory: StateDir, state: RingState) -> None:
            if not state.final:
                time.sleep(0.3)
            original(directory, state)

        monkeypatch.setattr(StateDir, "save_snapshot", slow)


def rotating(loop: asyncio.AbstractEventLoop, state: Path) -> tuple[Persistence, Channel]:
    persistence = Persistence(
        str(state), state_sync=3600, worker=0, loop=loop, rotate_min_bytes=100
    )
    channel = Channel(ROUTE, loop=loop)
    persistence.attach(channel, ROUTE)
    for n in range(20):
        channel.publish([Event("x" * 20, id=str(n))])
    persistence.flush()  # the journal passed 100 bytes: a rotation starts in a thread
    assert persistence.recorders[channel].rotating is not None
    return persistence, channel


def test_a_rotation_still_writing_at_stop_never_replaces_the_final_snapshot(
    loop: asyncio.AbstractEventLoop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowRotation(monkeypatch)
    persistence, channel = rotating(loop, tmp_path)
    for n in range(20, 25):
        channel.publish([Event("late", id=str(n))])
    loop.run_until_complete(persistence.save_all(within=5.0))
    loop.run_until_complete(asyncio.sleep(0.5))  # past the rotation's write
    assert [p.suffix for p in tmp_path.iterdir()] == [".snap"]
    _, again = process(loop, tmp_path)
    assert (again.ring.next_seq, again.upstream_last_id) == (25, "24")
    assert again.intake.id_prefix == channel.intake.id_prefix  # a clean stop, not a crash


def test_a_channel_freed_during_its_rotation_leaves_no_file_behind(
    loop: asyncio.AbstractEventLoop, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    SlowRotation(monkeypatch)
    persistence, channel = rotating(loop, tmp_path)
    channel.close()
    persistence.forget(channel)
    loop.run_until_complete(asyncio.sleep(0.6))  # the rotation's write ends
    assert list(tmp_path.iterdir()) == []
    _, again = process(loop, tmp_path)
    assert len(again.ring) == 0  # the next channel of that identity starts empty
