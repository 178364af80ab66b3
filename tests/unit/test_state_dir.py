"""stream.state with real files in tmp_path: naming, atomic snapshots, the
journal's recovery, load's handling of bad files, cleanup. Faults that a
test can't make for real as root (a full disk, an I/O error) are injected
into our own os.write / os.fsync calls for the length of one call."""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from ssefan.core.fanout import Intake
from ssefan.core.persist import (
    ChannelId,
    RingState,
    capture,
    journal_event,
    journal_header,
    journal_mark,
    restore_into,
)
from ssefan.core.ring import Ring
from ssefan.core.sse import Event
from ssefan.stream import state as state_mod
from ssefan.stream.state import (
    Journal,
    StateDir,
    StateDirError,
    StateWriteError,
    file_stem,
    write_snapshot,
)

ID = ChannelId("/rooms/{room}", "lobby", 1)
LIMIT = 1 << 20
MONO, WALL = 50.0, 1_700_000_000.0


def live(n: int, prefix: str = "p-") -> Intake:
    intake = Intake(Ring(max_events=100, max_bytes=1 << 20, max_age=0), prefix)
    for i in range(n):
        intake.accept([Event(f"event {i}", id=str(i) if i % 2 else None)], now=MONO)
    return intake


def state_of(intake: Intake, *, generation: int = 1, final: bool = False) -> RingState:
    return capture(
        intake.ring,
        intake,
        route=ID.route,
        key=ID.key,
        worker=ID.worker,
        mono_now=MONO,
        wall_now=WALL,
        generation=generation,
        final=final,
    )


def ids(state: RingState | None) -> list[str]:
    assert state is not None
    return [event[0] for event in state.events]


def event_record(intake: Intake, seq: int) -> bytes:
    return journal_event(seq, WALL, intake.ring.id_at(seq), intake.ring.join(seq, seq + 1))


def grow(intake: Intake, journal: Journal, n: int) -> None:
    """n more events, each journaled as a channel would."""
    for _ in range(n):
        seq = intake.ring.next_seq
        intake.accept([Event("more", id=f"m{seq}")], now=MONO)
        journal.append(event_record(intake, seq))
        journal.append(journal_mark(intake.last_upstream_id))


@pytest.fixture
def sd(tmp_path: Path) -> StateDir:
    return StateDir(tmp_path / "state")


def load(sd: StateDir, identity: ChannelId = ID) -> state_mod.Loaded:
    return sd.load(identity, max_record_bytes=LIMIT)


# ---------------------------------------------------------------- the directory


def test_the_directory_is_made_0700_and_files_0600(tmp_path: Path, sd: StateDir) -> None:
    assert stat.S_IMODE(os.stat(sd.path).st_mode) == 0o700
    sd.save_snapshot(state_of(live(3)))
    sd.new_journal(state_of(live(3))).close()
    for path in (sd.snapshot_path(ID), sd.journal_path(ID)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert sorted(p.name for p in sd.path.iterdir()) == sorted(
        [f"{file_stem(ID)}.snap", f"{file_stem(ID)}.journal"]
    )


def test_an_existing_directory_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o755)
    StateDir(tmp_path / "d")
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda p: (p.write_text("x"), p)[1], "exists and is not a directory", id="a-file"
        ),
        pytest.param(
            lambda p: (p.write_text("x"), p / "sub")[1],
            "can't be created (Not a directory)",
            id="under-a-file",
        ),
    ],
)
def test_an_unusable_directory_is_a_clear_error(
    tmp_path: Path, make: Callable[[Path], Path], message: str
) -> None:
    path = make(tmp_path / "f")
    with pytest.raises(StateDirError) as caught:
        StateDir(path)
    text = str(caught.value)
    assert f"state_dir {path} " in text and message in text
    assert "StateDirectory=ssefan" in text and "unset it" in text


def test_a_directory_even_root_cannot_write_is_a_clear_error() -> None:
    """/sys refuses new files to root too; elsewhere this has nothing to show."""
    try:
        fd = os.open("/sys/.ssefan-probe", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink("/sys/.ssefan-probe")
        pytest.skip("/sys takes new files here")
    with pytest.raises(StateDirError, match=r"^state_dir /sys is not writable \("):
        StateDir("/sys")


@pytest.mark.parametrize(
    "key",
    ["lobby", "../../etc/passwd", "a/b", "..", "x.y", "ключ", "k" * 4000, "CON", "a b\n", "snap"],
)
def test_file_names_never_hold_the_key(sd: StateDir, key: str) -> None:
    identity = ChannelId("/r/{k}", key, 0)
    for path in (sd.snapshot_path(identity), sd.journal_path(identity)):
        assert path.parent == sd.path
        stem, suffix = path.name.split(".")
        assert len(stem) == 32 and set(stem) <= set("0123456789abcdef")
        assert suffix in ("snap", "journal")
        assert key not in stem


def test_each_route_key_and_worker_has_its_own_files(sd: StateDir) -> None:
    names = {
        sd.snapshot_path(ChannelId(route, key, worker)).name
        for route in ("/a", "/a/{k}", "/a/")
        for key in ("", "x", "/a")
        for worker in (0, 1, 10)
    }
    assert len(names) == 3 * 3 * 3


def test_an_identity_with_nul_is_refused() -> None:
    """NUL joins the fields that are hashed: with none in them, no two collide."""
    with pytest.raises(ValueError, match="holds NUL"):
        ChannelId("/a\0", "", 0)
    with pytest.raises(ValueError, match="holds NUL"):
        ChannelId("/a", "\0", 0)


# ---------------------------------------------------------------- snapshots


def test_a_saved_snapshot_loads_back(sd: StateDir) -> None:
    state = state_of(live(5))
    sd.save_snapshot(state)
    loaded = load(sd)
    assert (loaded.state, loaded.journal, loaded.problems, loaded.notes) == (state, None, [], [])


def test_nothing_saved_loads_as_nothing(sd: StateDir) -> None:
    loaded = load(sd)
    assert (loaded.state, loaded.journal, loaded.problems, loaded.final) == (None, None, [], False)


def test_write_snapshot_replaces_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "x.snap"
    write_snapshot(path, b"old")
    write_snapshot(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["x.snap"]


def failing(name: str, code: int) -> Callable[..., object]:
    def fail(*args: object) -> object:
        raise OSError(code, os.strerror(code))

    return fail


@pytest.mark.parametrize(
    ("call", "code"),
    [
        pytest.param("write", errno.ENOSPC, id="disk-full"),
        pytest.param("fsync", errno.EIO, id="fsync-error"),
        pytest.param("replace", errno.EROFS, id="read-only"),
        pytest.param("open", errno.EACCES, id="no-permission"),
    ],
)
def test_a_failed_snapshot_write_keeps_the_old_one_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    path = tmp_path / "x.snap"
    write_snapshot(path, b"old")
    with monkeypatch.context() as m:
        m.setattr(os, call, failing(call, code))
        with pytest.raises(StateWriteError) as caught:
            write_snapshot(path, b"new")
    assert str(caught.value).startswith(f"could not write the snapshot {path}: {os.strerror(code)}")
    assert "(the previous snapshot is kept)" in str(caught.value)
    assert (caught.value.path, caught.value.errno) == (path, code)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.snap"]


def test_a_snapshot_that_cannot_be_saved_is_reported_and_the_old_one_loads(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = state_of(live(3))
    sd.save_snapshot(old)
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing("write", errno.ENOSPC))
        with pytest.raises(StateWriteError, match="No space left"):
            sd.save_snapshot(state_of(live(9), generation=2))
    assert load(sd).state == old


# ---------------------------------------------------------------- journals


def test_a_journal_continues_the_snapshot_and_is_handed_back_for_appending(
    sd: StateDir,
) -> None:
    intake = live(4)
    sd.save_snapshot(state_of(intake))
    journal = sd.new_journal(state_of(intake))
    grow(intake, journal, 3)
    assert journal.flush() > 0 and journal.pending == 0
    journal.fsync()
    journal.close()

    loaded = load(sd)
    assert ids(loaded.state) == ids(state_of(intake))
    assert loaded.state is not None and loaded.state.last_upstream_id == "m6"
    assert loaded.journal is not None and not loaded.final
    # Appending to the journal load gave back goes on where the file ended.
    grow(intake, loaded.journal, 2)
    loaded.journal.flush()
    loaded.journal.close()
    again = load(sd)
    assert ids(again.state) == ids(state_of(intake))
    assert again.problems == again.notes == []
    assert again.journal is not None
    again.journal.close()


def test_a_restored_channel_hands_out_the_ids_it_would_have(sd: StateDir) -> None:
    before = live(6)
    sd.save_snapshot(state_of(before))
    journal = sd.new_journal(state_of(before))
    grow(before, journal, 2)
    journal.flush()
    journal.close()
    loaded = load(sd)
    assert loaded.state is not None
    after = Intake(Ring(max_events=100, max_bytes=1 << 20, max_age=0), "other-")
    restore_into(loaded.state, after.ring, after, mono_now=1.0, wall_now=WALL + 5)
    assert after.next_assigned_id() == before.next_assigned_id() == "p-8"


def journal_file(sd: StateDir, intake: Intake, n: int) -> tuple[bytes, list[int]]:
    """A journal of n events after a snapshot of `intake`; the offsets where records end."""
    sd.save_snapshot(state_of(intake))
    head = journal_header(
        route=ID.route,
        key=ID.key,
        worker=ID.worker,
        generation=1,
        start_seq=intake.ring.next_seq,
        id_prefix="p-",
    )
    data, ends = head, [len(head)]
    for _ in range(n):
        seq = intake.ring.next_seq
        intake.accept([Event("x" * 40, id=f"j{seq}")], now=MONO)
        data += event_record(intake, seq)
        ends.append(len(data))
    return data, ends


def test_a_torn_journal_tail_at_any_offset_is_cut_and_the_rest_kept(
    sd: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    data, ends = journal_file(sd, live(2), 3)
    path = sd.journal_path(ID)
    caplog.set_level(logging.INFO, logger="ssefan.state")
    for n in range(ends[0], len(data) + 1):
        path.write_bytes(data[:n])
        caplog.clear()
        loaded = load(sd)
        whole = max(i for i, end in enumerate(ends) if end <= n)
        assert ids(loaded.state)[2:] == [f"j{2 + i}" for i in range(whole)], n
        assert path.stat().st_size == ends[whole]
        assert loaded.problems == []
        if n == ends[whole]:
            assert loaded.notes == []
        else:
            [note] = loaded.notes
            assert note.startswith(f"state file {path}: torn tail at offset {ends[whole]}: ")
            assert note.endswith(f"{whole} records kept, the file cut at byte {ends[whole]}")
            assert [r.levelname for r in caplog.records] == ["INFO"]
        assert loaded.journal is not None
        loaded.journal.close()


def test_a_damaged_journal_record_is_a_warning_and_what_precedes_it_is_kept(
    sd: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    data, ends = journal_file(sd, live(2), 3)
    damaged = bytearray(data)
    damaged[ends[1] + 12] ^= 0x40  # inside the second record's payload
    sd.journal_path(ID).write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="ssefan.state"):
        loaded = load(sd)
    assert ids(loaded.state)[2:] == ["j2"]
    assert loaded.problems == [
        f"state file {sd.journal_path(ID)}: record at offset {ends[1]}: checksum mismatch;"
        f" 1 records kept, the file cut at byte {ends[1]}"
    ]
    assert caplog.messages == loaded.problems
    assert loaded.journal is not None
    loaded.journal.close()


def test_a_journal_older_than_the_snapshot_is_removed(sd: StateDir) -> None:
    intake = live(3)
    journal = sd.new_journal(state_of(intake, generation=1))
    grow(intake, journal, 1)
    journal.flush()
    journal.close()
    newer = state_of(intake, generation=2)  # saved, then the process died before rotating
    sd.save_snapshot(newer)
    loaded = load(sd)
    assert (loaded.state, loaded.journal) == (newer, None)
    assert loaded.notes == [f"state file {sd.journal_path(ID)}: older than the snapshot, removed"]
    assert not sd.journal_path(ID).exists()


def test_a_failed_journal_write_is_cut_off_and_kept_for_the_next(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    intake = live(2)
    sd.save_snapshot(state_of(intake))
    journal = sd.new_journal(state_of(intake))
    grow(intake, journal, 2)
    journal.flush()
    size = journal.size
    grow(intake, journal, 2)
    pending = journal.pending

    calls = 0
    real_write = os.write

    def half_then_full(fd: int, data: object) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            return real_write(fd, memoryview(data)[:5])  # type: ignore[arg-type]
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "write", half_then_full)
        with pytest.raises(StateWriteError) as caught:
            journal.flush()
    assert str(caught.value) == (
        f"could not write the journal {journal.path}: No space left on device"
        f" ({pending} bytes wait for the next write)"
    )
    assert os.path.getsize(journal.path) == size  # the half record is gone
    assert journal.pending == pending
    grow(intake, journal, 1)
    journal.flush()  # the disk has room again: nothing was lost
    journal.close()
    assert ids(load(sd).state) == ids(state_of(intake))


def test_after_a_failed_fsync_the_journal_is_not_used_again(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = sd.new_journal(state_of(live(1)))
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", failing("fsync", errno.EIO))
        with pytest.raises(StateWriteError, match="Input/output error"):
            journal.fsync()
    assert journal.failed
    journal.append(b"x")
    with pytest.raises(StateWriteError, match="failed to sync before"):
        journal.flush()
    with pytest.raises(StateWriteError, match="failed to sync before"):
        journal.fsync()
    journal.close()


def test_take_and_write_split_a_flush(sd: StateDir) -> None:
    intake = live(1)
    sd.save_snapshot(state_of(intake))
    journal = sd.new_journal(state_of(intake))
    grow(intake, journal, 2)
    data = journal.take()
    assert journal.pending == 0 and len(data) > 0
    grow(intake, journal, 1)  # appends while `data` is being written elsewhere
    journal.write(data)
    journal.flush()
    journal.close()
    assert ids(load(sd).state) == ids(state_of(intake))


def test_rotation_moves_what_the_old_journal_buffers_into_the_new_one(sd: StateDir) -> None:
    intake = live(3)
    sd.save_snapshot(state_of(intake, generation=1))
    old = sd.new_journal(state_of(intake, generation=1))
    grow(intake, old, 2)
    old.flush()
    grow(intake, old, 1)  # buffered, below the new snapshot's next seq
    snapshot = state_of(intake, generation=2)
    grow(intake, old, 2)  # after the capture
    sd.save_snapshot(snapshot)
    new = sd.new_journal(snapshot)
    new.append(old.take())
    old.close()
    new.flush()
    new.close()
    loaded = load(sd)
    assert ids(loaded.state) == ids(state_of(intake))
    assert loaded.problems == loaded.notes == []


def test_a_clean_stop_is_final_until_the_next_journal(sd: StateDir) -> None:
    intake = live(3)
    journal = sd.new_journal(state_of(intake))
    grow(intake, journal, 1)
    journal.flush()
    journal.close()
    sd.save_snapshot(state_of(intake, generation=2, final=True))
    sd.end_journal(ID)
    loaded = load(sd)
    assert loaded.final and loaded.journal is None
    assert loaded.state is not None
    sd.new_journal(loaded.state).close()  # the next process runs
    assert not load(sd).final  # and if it dies, ids handed out since are unknown


# ---------------------------------------------------------------- bad files


def corrupt(sd: StateDir) -> tuple[Path, bytes]:
    sd.save_snapshot(state_of(live(3)))
    path = sd.snapshot_path(ID)
    return path, path.read_bytes()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        pytest.param(lambda d: b"", "empty file", id="empty"),
        pytest.param(lambda d: d[:-7], "truncated: ", id="truncated"),
        pytest.param(
            lambda d: d[:100] + bytes([d[100] ^ 4]) + d[101:], "checksum mismatch", id="bit"
        ),
        pytest.param(lambda d: d[:8] + b"\x07\x00" + d[10:], "unsupported version 7", id="version"),
        pytest.param(lambda d: b"PK\x03\x04" + d[4:], "bad magic", id="foreign"),
    ],
)
def test_a_bad_snapshot_is_logged_moved_aside_and_never_fatal(
    sd: StateDir, caplog: pytest.LogCaptureFixture, damage: Callable[[bytes], bytes], reason: str
) -> None:
    path, data = corrupt(sd)
    path.write_bytes(damage(data))
    with caplog.at_level(logging.WARNING, logger="ssefan.state"):
        loaded = load(sd)
    assert loaded.state is None
    [problem] = loaded.problems
    assert problem.startswith(f"state file {path}: ") and reason in problem
    assert problem.endswith(f"; moved to {path.name}.bad")
    assert caplog.messages == [problem]
    assert not path.exists() and (sd.path / f"{path.name}.bad").exists()


def test_another_channels_file_under_this_name_is_refused(sd: StateDir) -> None:
    other = ChannelId("/elsewhere", "", 0)
    sd.save_snapshot(
        RingState(
            route=other.route,
            key="",
            worker=0,
            id_prefix="p-",
            last_upstream_id="",
            first_seq=0,
            next_seq=0,
        )
    )
    os.replace(sd.snapshot_path(other), sd.snapshot_path(ID))
    [problem] = load(sd).problems
    assert "snapshot of route '/elsewhere', not '/rooms/{room}'" in problem


def test_a_bad_snapshot_leaves_the_journal_to_restore_from(sd: StateDir) -> None:
    data, _ = journal_file(sd, live(2), 2)
    sd.journal_path(ID).write_bytes(data)
    sd.snapshot_path(ID).write_bytes(b"garbage")
    loaded = load(sd)
    assert ids(loaded.state) == ["j2", "j3"]
    assert len(loaded.problems) == 1 and loaded.journal is not None
    loaded.journal.close()


def test_a_bad_journal_header_is_moved_aside(sd: StateDir) -> None:
    state = state_of(live(2))
    sd.save_snapshot(state)
    sd.journal_path(ID).write_bytes(b"\x89SSEjrnl\x02\x00rest")
    loaded = load(sd)
    assert loaded.state == state and loaded.journal is None
    assert loaded.problems == [
        f"state file {sd.journal_path(ID)}: unsupported version 2 (this ssefan reads version 1);"
        f" moved to {sd.journal_path(ID).name}.bad"
    ]


def test_an_unreadable_snapshot_is_a_problem_not_a_crash(sd: StateDir) -> None:
    sd.snapshot_path(ID).mkdir()  # read_bytes() of a directory: EISDIR
    [problem] = load(sd).problems
    assert problem == f"state file {sd.snapshot_path(ID)}: can't be read (Is a directory); not used"


# ---------------------------------------------------------------- cleaning up


def test_remove_deletes_a_channels_files(sd: StateDir) -> None:
    sd.save_snapshot(state_of(live(1)))
    sd.new_journal(state_of(live(1))).close()
    (sd.path / f"{file_stem(ID)}.snap.bad").write_bytes(b"")
    sd.remove(ID)
    sd.remove(ID)  # nothing left: fine
    assert list(sd.path.iterdir()) == []


def test_stale_lists_the_files_no_kept_channel_owns(sd: StateDir) -> None:
    kept = ID
    gone = ChannelId("/gone", "", 0)
    other_worker = ChannelId(ID.route, ID.key, 5)
    for identity in (kept, gone, other_worker):
        state = RingState(
            route=identity.route,
            key=identity.key,
            worker=identity.worker,
            id_prefix="p-",
            last_upstream_id="",
            first_seq=0,
            next_seq=0,
        )
        sd.save_snapshot(state)
        sd.new_journal(state).close()
    (sd.path / f"{file_stem(gone)}.journal.bad").write_bytes(b"")
    (sd.path / f"{file_stem(kept)}.snap.bad").write_bytes(b"")
    misnamed = sd.path / f"{'0' * 32}.snap"
    misnamed.write_bytes(sd.snapshot_path(kept).read_bytes())
    junk = sd.path / f"{'1' * 32}.journal"
    junk.write_bytes(b"junk")
    old_tmp = sd.path / "x.snap.1-2.tmp"
    old_tmp.write_bytes(b"")
    os.utime(old_tmp, (0, 0))
    young_tmp = sd.path / "y.snap.1-2.tmp"
    young_tmp.write_bytes(b"")
    theirs = sd.path / "README"
    theirs.write_text("not ssefan's")

    stale = sd.stale(lambda identity: identity.route != "/gone" and identity.worker < 2)
    assert stale == sorted(
        [
            sd.snapshot_path(gone),
            sd.journal_path(gone),
            sd.path / f"{file_stem(gone)}.journal.bad",
            sd.snapshot_path(other_worker),
            sd.journal_path(other_worker),
            misnamed,
            junk,
            old_tmp,
        ]
    )


def test_a_journal_that_cannot_be_applied_is_a_problem_not_a_crash(
    sd: StateDir, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file the decoder passes makes apply_journal fail today; if one ever
    did, load would still not raise."""
    state = state_of(live(2))
    sd.save_snapshot(state)
    sd.new_journal(state).close()

    def refuse(*args: object) -> RingState:
        raise ValueError("no ring holds this")

    monkeypatch.setattr(state_mod, "apply_journal", refuse)
    loaded = load(sd)
    assert loaded.state == state and loaded.journal is None
    assert loaded.problems == [
        f"state file {sd.journal_path(ID)}: can't be applied (no ring holds this);"
        f" moved to {sd.journal_path(ID).name}.bad"
    ]
