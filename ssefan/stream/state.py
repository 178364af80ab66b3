"""A channel's state files in `state_dir`: the I/O half of core/persist.py.

Plain blocking functions and classes, no asyncio: everything marked
*blocking* below touches the disk and belongs in an executor thread, with one
exception kept off the disk on purpose, `Journal.append` (the hot path: it
only adds bytes to a buffer). Per channel there are at most two files, named
by a hash of the channel's identity (`file_stem`), never by its key (a
template key is untrusted input: docs/threat-model.md):

    <stem>.snap      the last snapshot, replaced atomically
    <stem>.journal   the records since that snapshot
    <stem>.*.bad     a file that could not be used, kept aside for a look

The lifecycle the channel's owner follows (research note D.1-D.3):

1. start: `StateDir(path)`, then per channel `load()`: the state to restore
   (snapshot + journal, bad files moved aside and logged) and, when the
   journal on disk continues it, that journal opened for append. Restore the
   ring (`core.persist.restore_into`), then `new_journal(state)` if `load`
   gave no journal. Keep the saved id prefix only if `loaded.final` and
   `new_journal` succeeded. After a crash, events may have gone out after
   the last flush under ids `<prefix><seq>` that the restored ring would hand
   out again, so take a new prefix then (ids the ring holds stay resumable:
   they are looked up by id). Without a journal on disk, a later crash would
   look like a clean stop.
2. run: `journal.append(journal_event(...))` per ring append and
   `journal_mark(...)` when the last upstream id moved; every `state_sync`,
   `journal.flush()` (one `write()`: what SIGKILL can lose is what was not
   yet flushed); `fsync()` on a slower timer if a host crash should lose
   little too.
3. rotate (when `journal.size` passes what a snapshot costs): `capture(...,
   generation=previous + 1)` in the loop, then `save_snapshot` and
   `new_journal` for it, then move what the old journal still buffers into
   the new one (`new.append(old.take())`: records below the new start seq
   are skipped on replay) and close the old one.
4. stop: `save_snapshot(capture(..., generation=previous + 1, final=True))`,
   then `end_journal()`.
"""

from __future__ import annotations

import errno as errnos
import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ssefan.core.persist import (
    BadState,
    ChannelId,
    JournalRead,
    RingState,
    apply_journal,
    decode_journal,
    decode_snapshot,
    encode_snapshot,
    journal_header,
    peek_identity,
)

__all__ = [
    "Journal",
    "Loaded",
    "StateDir",
    "StateDirError",
    "StateWriteError",
    "file_stem",
    "identity_of",
    "write_snapshot",
]

log = logging.getLogger("ssefan.state")

SNAPSHOT_SUFFIX = ".snap"
JOURNAL_SUFFIX = ".journal"
BAD_SUFFIX = ".bad"
TMP_SUFFIX = ".tmp"
FILE_MODE = 0o600  # events may be private to the app's users
DIR_MODE = 0o700
# What stale() reads of a file to learn whose it is: a header's route, key
# and id prefix. A route path and a key come from a request head, which h11
# bounds far below this.
PEEK_BYTES = 256 * 1024
# A temporary file older than this is left over from a process that died
# mid-write (a write takes well under a second); a younger one may be a
# write in progress in another worker.
TMP_STALE_AFTER = 3600.0


def file_stem(identity: ChannelId) -> str:
    """The name a channel's files start with: 32 hex digits (128 bits) of
    SHA-256 of its identity, so no key, however hostile, reaches a file name.
    The fields hold no NUL (ChannelId refuses one), so the join is one-to-one."""
    raw = f"{identity.route}\0{identity.key}\0{identity.worker}"
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class StateDirError(Exception):
    """`state_dir` can't be used; the message names the path and what to do."""


class StateWriteError(Exception):
    """A state file could not be written (a full disk, a read-only file system,
    a permission, an I/O error); the message names the file and the error."""

    def __init__(self, message: str, path: Path, errno: int | None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


def _why(e: OSError) -> str:
    return e.strerror or errnos.errorcode.get(e.errno or 0, str(e))


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:  # a regular file takes all at once, short of a full disk or a signal
        view = view[os.write(fd, view) :]


def _fsync_dir(path: Path) -> None:
    """Make a rename or unlink in `path` durable (blocking)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[Path, int]:
    """A new file next to `path` (same file system: os.replace can't cross one)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}")
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    return tmp, os.open(tmp, flags, FILE_MODE)


def write_snapshot(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data` atomically and durably (blocking).

    Research note D.1: a temporary file in the same directory, written and
    fsynced, renamed over `path`, then the directory fsynced. Readers find
    the old file or the new one, never a mix. On failure the temporary file
    is removed and the old snapshot is left as it was; nothing is retried
    (after a failed fsync Linux may have dropped the dirty pages and cleared
    the error, so a second fsync of the same file proves nothing).

    Raises:
        StateWriteError: naming the file and the error (ENOSPC, EROFS, EACCES, EIO).
    """
    tmp: Path | None = None
    replaced = False
    try:
        tmp, fd = _temp_beside(path)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        replaced = True
        _fsync_dir(path.parent)
    except OSError as e:
        if replaced:
            kept = "the new snapshot is in place but may not survive a power cut"
        else:
            if tmp is not None:
                _unlink(tmp)
            kept = "the previous snapshot is kept"
        raise StateWriteError(
            f"could not write the snapshot {path}: {_why(e)} ({kept})", path, e.errno
        ) from e


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        log.warning("could not remove %s: %s", path, _why(e))
        return False
    return True


class Journal:
    """One channel's journal file, open for append.

    `append` gathers records in memory (no system call: the hot path);
    `flush` writes them with one `write()`. `take` and `write` are the two
    halves of `flush` for a caller that appends in one thread and writes in
    another: `take` (where the appends happen) swaps the buffer out, `write`
    (anywhere, one at a time) writes it. `size` is the file's length in good
    records. After a failed `fsync` the journal refuses to go on (`failed`):
    what the kernel still holds of it is unknown, so the owner starts a new
    one after a snapshot.
    """

    __slots__ = ("_buffer", "_fd", "_unwritten", "failed", "path", "size")

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self.size = size
        self._buffer = bytearray()
        self._unwritten = b""  # what a failed write() kept for the next one
        self.failed = False

    @classmethod
    def create(cls, path: Path, header: bytes) -> Journal:
        """A new journal holding `header`, replacing any at `path` atomically
        (blocking; as `write_snapshot`, so a reader never finds a half header).

        Raises:
            StateWriteError: naming the file and the error.
        """
        tmp: Path | None = None
        try:
            tmp, fd = _temp_beside(path)
            try:
                _write_all(fd, header)
                os.fsync(fd)
                os.replace(tmp, path)
                tmp = None
                _fsync_dir(path.parent)
            except BaseException:
                os.close(fd)
                raise
        except OSError as e:
            if tmp is not None:
                _unlink(tmp)
            raise StateWriteError(
                f"could not start the journal {path}: {_why(e)}", path, e.errno
            ) from e
        # Opened O_RDWR without O_APPEND: write at the end by hand.
        os.lseek(fd, 0, os.SEEK_END)
        return cls(path, fd, len(header))

    @classmethod
    def recover(
        cls, path: Path, *, identity: ChannelId, max_record_bytes: int
    ) -> tuple[Journal, JournalRead]:
        """Open an existing journal for append, cut after its last good record
        (blocking). The read says what was kept and what stopped the reading.

        Raises:
            FileNotFoundError: there is no journal.
            BadState: its header is not usable (see decode_journal).
            OSError: it can't be read or cut.
        """
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            data = _read_all(fd)
            read = decode_journal(
                data,
                expect_route=identity.route,
                expect_key=identity.key,
                expect_worker=identity.worker,
                max_record_bytes=max_record_bytes,
            )
            if read.good_length < len(data):
                os.ftruncate(fd, read.good_length)
                os.fsync(fd)
            os.lseek(fd, read.good_length, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, read.good_length), read

    @property
    def pending(self) -> int:
        """Bytes appended or kept from a failed write, not yet in the file."""
        return len(self._buffer) + len(self._unwritten)

    def append(self, record: bytes | bytearray) -> None:
        """Add a record (core.persist.journal_event / journal_mark): memory only."""
        self._buffer += record

    def take(self) -> bytearray:
        """What was appended since the last take, leaving the buffer empty."""
        data, self._buffer = self._buffer, bytearray()
        return data

    def write(self, data: bytes | bytearray) -> None:
        """Write `data` (from `take`) after what a failed write kept (blocking).

        A write that fails is cut back off the file, so it never holds half a
        record, and its bytes are kept for the next write: a full disk that
        frees up loses nothing. `pending` tells how much is waiting.

        Raises:
            StateWriteError: naming the file and the error; also once `failed`.
        """
        self._check()
        if self._unwritten:
            data = self._unwritten + data
            self._unwritten = b""
        if not data:
            return
        try:
            _write_all(self._fd, data)
        except OSError as e:
            self._unwritten = bytes(data)
            try:
                os.ftruncate(self._fd, self.size)
                os.lseek(self._fd, self.size, os.SEEK_SET)
            except OSError:
                self.failed = True  # a half record may stay: nothing after it would read
            raise StateWriteError(
                f"could not write the journal {self.path}: {_why(e)} "
                f"({self.pending} bytes wait for the next write)",
                self.path,
                e.errno,
            ) from e
        self.size += len(data)

    def flush(self) -> int:
        """Write what was appended (`take` + `write`, blocking); returns its length."""
        data = self.take()
        self.write(data)
        return len(data)

    def fsync(self) -> None:
        """Make what was written durable (blocking). Not retried after a failure.

        Raises:
            StateWriteError: naming the file and the error; also once `failed`.
        """
        self._check()
        try:
            os.fsync(self._fd)
        except OSError as e:
            self.failed = True
            raise StateWriteError(
                f"could not sync the journal {self.path}: {_why(e)} (it is not used again;"
                " a snapshot and a new journal replace it)",
                self.path,
                e.errno,
            ) from e

    def close(self) -> None:
        """Close the file; what was appended and not flushed is dropped."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _check(self) -> None:
        if self._fd < 0:
            raise StateWriteError(f"the journal {self.path} is closed", self.path, None)
        if self.failed:
            raise StateWriteError(
                f"the journal {self.path} failed to sync before and is not written again",
                self.path,
                None,
            )


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(slots=True)
class Loaded:
    """What `StateDir.load` found for one channel.

    `state`: what to restore, or None (the channel starts empty). `journal`:
    the journal on disk, open for append, when it continues `state`; None
    when the owner must start one (`StateDir.new_journal`). `problems` were
    logged as warnings (a file that could not be used and why; each is also
    moved aside or cut), `notes` at info (a torn tail after a crash, a
    journal older than its snapshot).
    """

    state: RingState | None = None
    journal: Journal | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def final(self) -> bool:
        """The state is a clean stop's last snapshot: ids may continue as they were."""
        return self.state is not None and self.state.final


class StateDir:
    """The directory holding every channel's state files (`state_dir`)."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Check that `path` is a writable directory, making it (0700) if absent (blocking).

        Raises:
            StateDirError: it can't be made, isn't a directory or isn't
                writable; the message says what to do.
        """
        self.path = Path(path)
        advice = (
            "make it a directory the user ssefan runs as can write "
            "(systemd: StateDirectory=ssefan), point state_dir elsewhere, "
            "or unset it to keep no state"
        )
        try:
            self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        except FileExistsError:
            raise StateDirError(
                f"state_dir {self.path} exists and is not a directory: {advice}"
            ) from None
        except OSError as e:
            raise StateDirError(
                f"state_dir {self.path} can't be created ({_why(e)}): {advice}"
            ) from None
        try:
            probe, fd = _temp_beside(self.path / ".probe")
            os.close(fd)
            probe.unlink()
        except OSError as e:
            raise StateDirError(
                f"state_dir {self.path} is not writable ({_why(e)}): {advice}"
            ) from None

    def snapshot_path(self, identity: ChannelId) -> Path:
        return self.path / f"{file_stem(identity)}{SNAPSHOT_SUFFIX}"

    def journal_path(self, identity: ChannelId) -> Path:
        return self.path / f"{file_stem(identity)}{JOURNAL_SUFFIX}"

    # -- start --------------------------------------------------------------

    def load(self, identity: ChannelId, *, max_record_bytes: int) -> Loaded:
        """The channel's saved state: its snapshot with its journal applied (blocking).

        Never fails: a file that can't be used is logged (file, what was
        wrong), moved aside as `*.bad` and left out; with neither usable the
        state is None. A torn journal tail is cut off; a journal older than
        the snapshot is removed (the snapshot holds all of it).
        """
        loaded = Loaded()
        snap = self.snapshot_path(identity)
        state: RingState | None = None
        try:
            data = snap.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as e:
            self._problem(loaded, f"state file {snap}: can't be read ({_why(e)}); not used")
        else:
            try:
                state = decode_snapshot(
                    data,
                    expect_route=identity.route,
                    expect_key=identity.key,
                    expect_worker=identity.worker,
                    max_record_bytes=max_record_bytes,
                )
            except BadState as e:
                self._problem(loaded, f"state file {snap}: {e.reason}; {self._set_aside(snap)}")
        path = self.journal_path(identity)
        try:
            journal, read = Journal.recover(
                path, identity=identity, max_record_bytes=max_record_bytes
            )
        except FileNotFoundError:
            pass
        except BadState as e:
            self._problem(loaded, f"state file {path}: {e.reason}; {self._set_aside(path)}")
        except OSError as e:
            self._problem(loaded, f"state file {path}: can't be read or cut ({_why(e)})")
        else:
            if read.problem is not None:
                kept = f"{len(read.records)} records kept, the file cut at byte {read.good_length}"
                message = f"state file {path}: {read.problem}; {kept}"
                if read.torn:
                    self._note(loaded, message)
                else:
                    self._problem(loaded, message)
            if state is not None and read.header.generation < state.generation:
                journal.close()
                _unlink(path)
                self._note(loaded, f"state file {path}: older than the snapshot, removed")
            else:
                try:
                    state = apply_journal(state, read)
                except ValueError as e:  # records the checks let through, yet no ring holds
                    journal.close()
                    why = f"state file {path}: can't be applied ({e}); {self._set_aside(path)}"
                    self._problem(loaded, why)
                else:
                    loaded.journal = journal
        loaded.state = state
        return loaded

    def _set_aside(self, path: Path) -> str:
        bad = path.with_name(path.name + BAD_SUFFIX)
        try:
            os.replace(path, bad)
        except OSError:
            return "removed" if _unlink(path) else "left in place"
        return f"moved to {bad.name}"

    @staticmethod
    def _problem(loaded: Loaded, message: str) -> None:
        log.warning("%s", message)
        loaded.problems.append(message)

    @staticmethod
    def _note(loaded: Loaded, message: str) -> None:
        log.info("%s", message)
        loaded.notes.append(message)

    # -- writing ------------------------------------------------------------

    def save_snapshot(self, state: RingState) -> None:
        """Encode `state` and write it as its channel's snapshot (blocking).

        Raises:
            StateWriteError: the old snapshot is kept (see write_snapshot).
        """
        write_snapshot(self.snapshot_path(state.identity), encode_snapshot(state))

    def new_journal(self, state: RingState) -> Journal:
        """Start the channel's journal after `state` (its generation, its next
        seq), replacing the old one atomically (blocking).

        Raises:
            StateWriteError: the old journal, if any, is left as it was.
        """
        header = journal_header(
            route=state.route,
            key=state.key,
            worker=state.worker,
            generation=state.generation,
            start_seq=state.next_seq,
            id_prefix=state.id_prefix,
        )
        return Journal.create(self.journal_path(state.identity), header)

    def end_journal(self, identity: ChannelId) -> None:
        """Remove the journal after a final snapshot (blocking): with none
        following it, the next start knows nothing was handed out after it.

        Raises:
            StateWriteError: it could not be removed.
        """
        path = self.journal_path(identity)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(self.path)
        except OSError as e:
            raise StateWriteError(
                f"could not remove the journal {path}: {_why(e)}", path, e.errno
            ) from e

    def remove(self, identity: ChannelId) -> None:
        """Delete a channel's files, its route gone (blocking; missing ones are fine)."""
        stem = file_stem(identity)
        for suffix in (SNAPSHOT_SUFFIX, JOURNAL_SUFFIX):
            for name in (stem + suffix, stem + suffix + BAD_SUFFIX):
                _unlink(self.path / name)

    # -- cleaning -----------------------------------------------------------

    def stale(self, keep: Callable[[ChannelId], bool]) -> list[Path]:
        """Files of the directory no channel will use again (blocking).

        A snapshot or journal is stale when `keep` refuses its identity (read
        from its header: a route gone from the config, a worker beyond the
        current count), when it is not a state file of this version, or when
        its name is not its identity's. A `.bad` file is stale once its
        channel has no live file, a temporary one once it is older than
        TMP_STALE_AFTER. Other files are none of ssefan's and are left alone.
        """
        stale: list[Path] = []
        live: set[str] = set()
        bad: list[Path] = []
        now = time.time()
        with os.scandir(self.path) as entries:
            for entry in entries:
                if not entry.is_file(follow_symlinks=False):
                    continue
                path = Path(entry.path)
                name = entry.name
                if name.endswith(TMP_SUFFIX):
                    if now - entry.stat(follow_symlinks=False).st_mtime > TMP_STALE_AFTER:
                        stale.append(path)
                elif name.endswith(BAD_SUFFIX):
                    bad.append(path)
                elif name.endswith((SNAPSHOT_SUFFIX, JOURNAL_SUFFIX)):
                    stem = name.split(".", 1)[0]
                    identity = identity_of(path)
                    if identity is None or file_stem(identity) != stem or not keep(identity):
                        stale.append(path)
                    else:
                        live.add(stem)
        stale += [path for path in bad if path.name.split(".", 1)[0] not in live]
        return sorted(stale)


def identity_of(path: Path) -> ChannelId | None:
    try:
        with path.open("rb") as f:
            head = f.read(PEEK_BYTES)
        return peek_identity(head)
    except (OSError, BadState):
        return None
