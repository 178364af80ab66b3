"""Rings that outlive the process: the asyncio side of `state_dir`.

One `Persistence` per process keeps, per channel, a journal of what its ring
took (core/persist.py's format, stream/state.py's files):

- **Start.** `attach` restores a channel's ring before it serves anyone: its
  events under the same sequence numbers, its evicted-id memory, the last
  upstream id (the upstream resumes with it as Last-Event-ID, and the usual
  de-duplication drops the app's replay overlap) and, after a clean stop, the
  prefix of the ids ssefan assigns, so every id a client holds still resumes.
  After a crash a new prefix is taken: ids handed out after the last write
  could otherwise name a second event. Static routes are restored before the
  listener opens; a template key when its channel is next made.
- **Run.** `Channel.publish` hands each new ring entry to its `Recorder`,
  which appends a record to an in-memory buffer (no system call per event);
  every `state_sync` one write() per channel puts the buffers in the page
  cache, which a SIGKILL does not lose. A journal past `rotate_bytes` is
  folded into a new snapshot, written in a thread.
- **Stop.** `save_all` writes every ring's final snapshot (atomic: temporary
  file, fsync, rename, fsync of the directory) in a thread under a deadline,
  then removes the journals. A full disk or a read-only directory is logged
  and the process still exits.

Bad state is never fatal: a file that can't be used is logged, moved aside
and the channel starts empty (stream/state.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from ssefan.config import RouteConfig
from ssefan.core.persist import (
    ChannelId,
    RingState,
    capture,
    journal_event,
    journal_mark,
    restore_into,
)
from ssefan.core.persist import record_limit as max_record
from ssefan.stream.channel import Channel
from ssefan.stream.state import Journal, StateDir, StateWriteError, file_stem, identity_of

__all__ = ["Persistence", "Recorder"]

log = logging.getLogger("ssefan.state")

# A journal is folded into a snapshot once it holds this much more than the
# ring does: replaying it at start stays bounded, and a quiet ring is never
# rewritten.
ROTATE_MIN_BYTES = 4 * 1024 * 1024
ROTATE_FACTOR = 2


class Recorder:
    """One channel's journal: what `Channel.publish` hands each new ring entry."""

    __slots__ = (
        "_last_mark",
        "channel",
        "failed",
        "generation",
        "identity",
        "journal",
        "rotating",
    )

    def __init__(self, channel: Channel, identity: ChannelId, journal: Journal, generation: int):
        self.channel = channel
        self.identity = identity
        self.journal = journal
        self.generation = generation
        self._last_mark = channel.upstream_last_id
        # A rotation's write, while one runs in a thread (save_all waits for it).
        self.rotating: asyncio.Future[Journal] | None = None
        self.failed = False

    def record(self, start_seq: int) -> None:
        """The ring took seqs [start_seq, next_seq); the last upstream id may have moved."""
        channel = self.channel
        ring = channel.ring
        journal = self.journal
        stop = ring.next_seq
        if stop > start_seq:
            # Monotonic ring times as wall clock, for the next process.
            shift = time.time() - channel.clock()
            for seq in range(max(start_seq, ring.first_seq), stop):
                journal.append(
                    journal_event(
                        seq, ring.time_at(seq) + shift, ring.id_at(seq), ring.join(seq, seq + 1)
                    )
                )
        last = channel.upstream_last_id
        if last != self._last_mark:
            self._last_mark = last
            journal.append(journal_mark(last))


class Persistence:
    """The channels' state files, in one directory, for one process (or worker)."""

    def __init__(
        self,
        path: str,
        *,
        state_sync: float,
        worker: int,
        loop: asyncio.AbstractEventLoop,
        rotate_min_bytes: int = ROTATE_MIN_BYTES,
    ) -> None:
        self.dir = StateDir(Path(path))  # raises StateDirError: the message names the path
        self.state_sync = state_sync
        self.worker = worker
        self.loop = loop
        self.rotate_min_bytes = rotate_min_bytes
        self.recorders: dict[Channel, Recorder] = {}
        self.stopping = False
        self.timed_out = False  # save_all's writer did not finish in time
        self._timer: asyncio.TimerHandle | None = None
        self._saved: set[ChannelId] = set()  # snapshots written by this process's stop

    # -- start --------------------------------------------------------------------

    def attach(self, channel: Channel, route: RouteConfig, key: str = "") -> None:
        """Restore `channel`'s ring from its files (if any) and start its journal.

        Blocking (a read of the channel's files): called before the listener
        opens for static routes, and when a template key's channel is made.
        """
        identity = ChannelId(route.path, key, self.worker)
        upstream = route.upstream
        loaded = self.dir.load(
            identity, max_record_bytes=max_record(upstream.max_event_bytes, upstream.max_line_bytes)
        )
        fresh_prefix = channel.intake.id_prefix
        state = loaded.state
        generation = 0
        if state is not None:
            now_mono, now_wall = channel.clock(), time.time()
            restore_into(state, channel.ring, channel.intake, mono_now=now_mono, wall_now=now_wall)
            generation = state.generation
            log.info(
                "route=%s restored %d events (seq %d..%d, last upstream id %.64r) from %s",
                channel.label,
                len(channel.ring),
                channel.ring.first_seq,
                channel.ring.next_seq - 1,
                state.last_upstream_id,
                self.dir.path,
            )
        journal = loaded.journal
        if journal is None:
            try:
                journal = self.dir.new_journal(self._capture(channel, identity, generation))
            except StateWriteError as err:
                log.warning(
                    "route=%s state not kept: %s; the ring works as without state_dir",
                    channel.label,
                    err,
                )
                return
        if state is not None and not loaded.final:
            # After a crash, ids `<prefix><seq>` may have gone out after the
            # last write that this ring would give again: this process's own
            # prefix instead. Ids the ring holds still resume (by id).
            channel.intake.id_prefix = (
                fresh_prefix if fresh_prefix != state.id_prefix else _another_prefix(fresh_prefix)
            )
        recorder = Recorder(channel, identity, journal, generation)
        self.recorders[channel] = recorder
        channel.recorder = recorder

    def remove_stale(self, keep: Callable[[ChannelId], bool]) -> None:
        """Deal with the files no channel of this config will use (blocking).

        A file of a route (or worker) no longer configured is removed. One
        whose header can't be read (empty, another format version, damaged)
        or belongs to another channel than its name says is moved aside as
        `*.bad` with a warning: it is a surprise someone may want to look at.
        """
        for path in self.dir.stale(keep):
            if path.name.endswith((".bad", ".tmp")):
                path.unlink(missing_ok=True)
                continue
            identity = identity_of(path)
            if identity is not None and file_stem(identity) == path.name.split(".", 1)[0]:
                path.unlink(missing_ok=True)
                log.info(
                    "state file %s (route %s) belongs to no route of this config: removed",
                    path.name,
                    identity.route,
                )
                continue
            why = (
                "its header can't be read (an empty file, another format version or damage)"
                if identity is None
                else f"it holds route {identity.route!r}'s state under another channel's name"
            )
            path.replace(path.with_name(path.name + ".bad"))
            log.warning("state file %s: %s; moved aside as %s.bad", path, why, path.name)

    def start(self) -> None:
        self._timer = self.loop.call_later(self.state_sync, self._tick)

    # -- run ------------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer = self.loop.call_later(self.state_sync, self._tick)
        self.flush()

    def flush(self) -> None:
        """One write per journal with something buffered (page cache: a SIGKILL keeps it)."""
        for recorder in list(self.recorders.values()):
            journal = recorder.journal
            if recorder.failed or recorder.rotating is not None or not journal.pending:
                continue
            try:
                journal.flush()
            except (OSError, StateWriteError) as err:
                self._failed(recorder, err)
                continue
            held = recorder.channel.ring.held_bytes
            if journal.size > max(self.rotate_min_bytes, ROTATE_FACTOR * held):
                self._rotate(recorder)

    def _rotate(self, recorder: Recorder) -> None:
        """Fold the journal into a snapshot, written in a thread; appends go on meanwhile."""
        state = self._capture(recorder.channel, recorder.identity, recorder.generation + 1)

        def write() -> Journal:
            self.dir.save_snapshot(state)
            return self.dir.new_journal(state)

        def done(future: asyncio.Future[Journal]) -> None:
            recorder.rotating = None
            if future.cancelled():
                return  # the executor shut down: the process is leaving
            error = future.exception()
            if self.recorders.get(recorder.channel) is not recorder:
                # Forgotten meanwhile (a freed key, a removed route): what the
                # thread wrote must not outlive the channel, nor be restored.
                if error is None:
                    future.result().close()
                if not self.stopping:
                    self.dir.remove(recorder.identity)
                return
            if error is not None:
                self._failed(recorder, error)
                return
            old, new = recorder.journal, future.result()
            new.append(old.take())  # what came meanwhile; replay skips what the snapshot holds
            old.close()
            recorder.journal = new
            recorder.generation = state.generation

        recorder.rotating = self.loop.run_in_executor(None, write)
        recorder.rotating.add_done_callback(done)

    def _failed(self, recorder: Recorder, error: BaseException) -> None:
        recorder.failed = True
        recorder.channel.recorder = None
        log.warning(
            "route=%s state_dir write failed (%s): this channel's ring is no longer kept"
            " across restarts; check the disk and the directory's permissions",
            recorder.channel.label,
            error,
        )

    def forget(self, channel: Channel) -> None:
        """A channel closed (a freed template key, a removed route): its files go too,
        unless the process is stopping (then they are its final state)."""
        recorder = self.recorders.pop(channel, None)
        if recorder is None:
            return
        channel.recorder = None
        if self.stopping:
            return  # save_all's thread owns the journals now, and the files are final
        recorder.journal.close()
        if recorder.rotating is None:  # else the rotation's end removes what it wrote
            self.dir.remove(recorder.identity)

    # -- stop -----------------------------------------------------------------------

    async def save_all(self, within: float) -> int:
        """Every ring's final snapshot, then its journal removed; returns how many
        were saved. Within `within` seconds: what is not written by then is
        logged, and the process exits anyway."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
        deadline = self.loop.time() + within
        rotations = [r.rotating for r in self.recorders.values() if r.rotating is not None]
        if rotations:
            # A rotation still writing would put its older snapshot back
            # after the final one: let it end first.
            await asyncio.wait(rotations, timeout=within)
        states = [
            (
                recorder,
                self._capture(
                    recorder.channel, recorder.identity, recorder.generation + 1, final=True
                ),
            )
            for recorder in self.recorders.values()
            if not recorder.failed
        ]

        def write() -> int:
            saved = 0
            for recorder, state in states:
                try:
                    self.dir.save_snapshot(state)
                    recorder.journal.close()
                    self.dir.end_journal(state.identity)
                except (OSError, StateWriteError) as err:
                    log.warning(
                        "route=%s final snapshot not written (%s): the next start resumes"
                        " from the journal, or empty",
                        recorder.channel.label,
                        err,
                    )
                    continue
                self._saved.add(state.identity)
                saved += 1
            return saved

        try:
            async with asyncio.timeout(max(0.0, deadline - self.loop.time())):
                saved = await self.loop.run_in_executor(None, write)
        except TimeoutError:
            self.timed_out = True
            log.warning(
                "state_dir: final snapshots not all written within %.1fs (shutdown_timeout)",
                within,
            )
            return len(self._saved)
        log.info("state_dir: saved %d rings to %s", saved, self.dir.path)
        return saved

    def drop_unsaved_keys(self, routes: Iterable[str]) -> None:
        """After save_all: template keys' files this run did not write (keys not
        reopened since the last start) are dropped, so files stay bounded by
        the keys live at the last stop (blocking)."""
        if self.timed_out:
            return  # the writer may still be saving them: keep what is there
        templates = set(routes)
        self.remove_stale(lambda id: not (id.key and id.route in templates) or id in self._saved)

    def _capture(
        self, channel: Channel, identity: ChannelId, generation: int, *, final: bool = False
    ) -> RingState:
        return capture(
            channel.ring,
            channel.intake,
            route=identity.route,
            key=identity.key,
            worker=identity.worker,
            mono_now=channel.clock(),
            wall_now=time.time(),
            generation=generation,
            final=final,
        )


def _another_prefix(taken: str) -> str:
    """A prefix other than `taken` (a channel's own is the time in ms and the pid:
    the same again only within one millisecond of one process)."""
    while True:
        prefix = f"{secrets.token_hex(6)}-"
        if prefix != taken:
            return prefix
