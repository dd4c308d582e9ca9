"""The durable spool: store, read, update and remove queued messages; nothing is lost.

``store()`` returns only when the message is on disk for good: one file (header line,
envelope, message) written in ``tmp/`` with ``O_DSYNC`` (on disk when the write
returns, as after an fdatasync), renamed into ``queue/``, and ``queue/`` fsynced, all
in one worker thread (the event loop never waits for the disk: finished messages are
unlinked in batches by ``relay.spool.reaper``; ``relay.spool.diskio`` makes the calls,
this module decides what and when).

Measured on the reference 2-core ext4 VM with 20 concurrent store+remove loops: about
1,500 messages/s at ~0.6 ms CPU each (most of it kernel time). Group commit of the
directory fsync (one fsync acknowledging several renames, done both on the loop and
between threads) cut fsync calls 2-6x but gave no measurable throughput or CPU gain,
since the kernel's journal already merges concurrent commits; so each store fsyncs the
directory itself, which is simpler to reason about. Recycling emptied files instead of
creating new ones only helped on a freshly made filesystem (uninitialised inodes).

Crash safety, by the state a crash can leave:
- a file in ``tmp/``: never acknowledged; ``recover()`` deletes it;
- ``queue/<ID>`` without ``<ID>.state``: a fresh message, delivered to everyone;
- ``queue/<ID>.state``: written to tmp/, fsynced and renamed over the old one, so it is
  always a complete old or new state;
- ``remove()`` unlinks the state first, then the message. A crash in between leaves a
  fresh message that is delivered again (at least once, as after a crash between the
  upstream's 250 and removal), never an orphan state file, which recovery treats as
  damage. The other order would turn every such crash into a spurious ``corrupt/`` entry.
  Removal does not fsync the directory: an unlink is final for any process crash, and
  only a power loss could bring a delivered message back, to be delivered again.
  It skips the state file's unlink for a message this process saw arrive (``adopt()``)
  and never began to write a state for: most mail is delivered at its first attempt,
  and that unlink would fail (ENOENT) for each. Anything else, every message found on
  disk at start-up included, gets it. Only the lock holder writes state files, so this
  knowledge needs nothing on disk: a new process starts from "may have one".

The bytes of a freshly stored message are kept in memory (bounded) for its first delivery
attempt, so the happy path never reads a message back from disk.

The spool holds only messages with CRLF line endings: no CR or LF outside a CRLF pair
(a bare one could smuggle a header or a second message past a provider). ``store()`` is
the only way into ``queue/`` and enforces it: it refuses (``BareLineEndingError``, a
SpoolError) any other message, unless its caller vouches with ``crlf_checked=True``
because it has made sure already. So delivery sends what it reads from here without
scanning it again (``relay.outbound.attempt``): ~175 µs per 100 KB per attempt saved.
The callers of ``store()``:

- the SMTP accept pipeline (``relay.smtp.accept``, in the main process or a listener
  process, which then hands the stored message over with ``adopt()``) vouches: its DATA
  reader (``relay.smtp.data``) refuses any message with a bare CR or LF, and nothing
  relay adds before the store can bring one (that pipeline's docstring says why);
- the DSN builder (``relay.outbound.dsn``) does not vouch: a DSN is small (headers only),
  so the check costs next to nothing, and it quotes addresses and replies.

Nothing else writes ``queue/``: the queue tools and the control socket read, hold,
retry and delete, and recovery only moves damaged files out.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relay.envelope import Envelope
from relay.errors import BareLineEndingError, SpoolError
from relay.metrics import Metrics
from relay.offload import Pool
from relay.spool import recovery
from relay.spool.diskio import SpoolDisk
from relay.spool.health import SpoolHealth
from relay.spool.layout import (
    FormatError,
    IdGenerator,
    bare_line_ending,
    encode_envelope,
    encode_state,
    fresh_state,
    is_queue_id,
    message_header,
)
from relay.spool.lock import SpoolLock
from relay.spool.memo import FreshCache, KeyedLocks
from relay.spool.reaper import Reaper
from relay.spool.records import QueuedMessage

log = logging.getLogger("relay.spool")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SpoolStats:
    counts: dict[str, int]               # by state: active, deferred, held
    oldest_received: float | None        # Unix time the oldest queued message arrived


@dataclass(slots=True)
class _Entry:                            # what stats() needs, kept per queued message
    received_at: float
    held: bool
    next_attempt: float


# The spool's blocking calls, as many side by side as the loop's default executor would
# run; a Pool hands results back with less work per call than the executor (offload).
_DISK = Pool("relay-spool", threads=min(32, (os.cpu_count() or 1) + 4))


def _in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` on one of the spool's threads."""
    return _DISK.run(fn, *args)


class Spool:
    """The on-disk queue under ``root`` (see ``relay.spool.layout`` for the files)."""

    def __init__(self, root: Path, *, fsync: bool = True, metrics: Metrics | None = None,
                 written: Callable[[QueuedMessage, bytes], None] | None = None,
                 reserve: int = 0):
        # written: this is an SMTP listener process's spool, which only store()s and hands
        # each stored message to ``written``; the main process (lock, recovery, index,
        # delivery) learns of it through adopt(). No index, no listeners here.
        self._written = written
        self.root = Path(root)
        # free space, read-only and write failures: MAIL checks, /readyz (relay.spool.health)
        self.health = SpoolHealth(self.root, reserve=reserve, metrics=metrics)
        self._disk = SpoolDisk(self.root, fsync=fsync, health=self.health)  # worker threads
        self.tmp, self.queue, self.corrupt = self._disk.tmp, self._disk.queue, self._disk.corrupt
        self._metrics = metrics
        self._ids = IdGenerator()
        self._index: dict[str, _Entry] = {}
        self._listeners: list[Callable[[QueuedMessage], None]] = []
        self._lock = SpoolLock(self.root / "lock")
        self._locks = KeyedLocks()
        self._fresh = FreshCache()           # handed to the first attempt: no re-read
        self._reaper = Reaper(self._disk.unlink, _in_thread)   # remove(): batched unlinks
        # Ids whose queue/<ID>.state may exist: each found on disk (recover, scan) and each
        # save_state() began to write (it may be on disk even if the write failed).
        self._state_files: set[str] = set()

    # --- set-up ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the queue directory descriptor and release the lock (if held)."""
        self._disk.close()
        self._lock.release()

    def lock(self, *, timeout: float = 0.0) -> SpoolLock:
        """Take the spool lock (held until ``close()`` or the returned lock's release()).

        Raises SpoolError naming the holder if another relay or queue command has it.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock.acquire(timeout=timeout)
        return self._lock

    def is_locked_by_other(self) -> bool:
        """True if another process (a running relay) holds the spool lock."""
        return self._lock.held_by_other()

    def recover(self) -> list[QueuedMessage]:
        """Start-up: remove tmp/ leftovers, move damaged files to corrupt/, index the rest.

        Refuses while another process holds the spool lock: its unfinished writes in tmp/
        are not leftovers. Take ``lock()`` first.
        """
        if self.is_locked_by_other():
            raise SpoolError(f"the spool {self.root} is in use by process "
                             f"{self._lock.holder_pid() or '?'}; not recovering under it",
                             hint="stop the other relay first, or use `relay queue` to "
                                  "inspect a running relay's queue")
        self._disk.prepare()
        try:
            recovery.clean_tmp(self.tmp)
            moved: list[str] = []
            found = recovery.scan(self.queue, self.corrupt, moved=moved)
        except OSError as exc:                  # the directory itself, not one file
            raise SpoolError(f"cannot read the spool {self.root}: {exc.strerror or exc}",
                             hint="check the spool filesystem (mount, permissions, kernel "
                                  "log for I/O errors)") from exc
        recovery.fsync_dirs(self.queue, self.corrupt, self.tmp)
        if moved and self._metrics is not None:
            self._metrics.spool_quarantined.inc(len(moved))
        self._reindex(found)
        log.info("spool: %d queued message(s) in %s", len(found), self.queue)
        return found

    def scan(self) -> list[QueuedMessage]:
        """Read-only recovery for tools: index good messages, move and delete nothing."""
        self._disk.prepare()
        found = recovery.scan(self.queue, None)
        self._reindex(found)
        return found

    def _reindex(self, found: list[QueuedMessage]) -> None:
        self._index = {m.queue_id: _Entry(m.envelope.received_at, m.state.held,
                                          m.state.next_attempt) for m in found}
        self._state_files.update(self._index)

    def add_listener(self, callback: Callable[[QueuedMessage], None]) -> None:
        """Call ``callback`` (on the loop) after each successful store()."""
        self._listeners.append(callback)

    # --- the write path ----------------------------------------------------------------------

    async def store(self, envelope: Envelope, data: bytes, *,
                    crlf_checked: bool = False) -> str:
        """Spool a message durably and return its queue id (see the module docstring).

        ``data`` must have CRLF line endings only: a bare CR or LF raises
        ``BareLineEndingError`` and nothing is written. ``crlf_checked=True``: the caller
        vouches that there is none (it checked already), and the scan is skipped.

        Once the write has begun it completes even if the caller is cancelled, so the
        message is either refused (exception) or queued and handed to the listeners.
        """
        if not crlf_checked and (kind := bare_line_ending(data)) is not None:
            raise BareLineEndingError(kind)
        self._disk.prepare()
        queue_id = self._ids.new()
        head = message_header(encode_envelope(envelope), len(data))
        # The write's own future is nobody's to cancel: the caller waits on ``answer``,
        # and _stored announces the message whether or not the caller still waits.
        written = _in_thread(self._disk.write_message, queue_id, head, data)
        answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        written.add_done_callback(
            functools.partial(self._stored, envelope, data, queue_id, answer))
        return await answer

    def _stored(self, envelope: Envelope, data: bytes, queue_id: str,
                answer: asyncio.Future[str], written: asyncio.Future[None]) -> None:
        """The write of ``queue_id`` ended (on the loop): announce it, answer the caller."""
        error = written.exception() if not written.cancelled() else SpoolError(
            f"spool {self.root}: the write of {queue_id} was cancelled",
            hint="nothing in relay cancels a spool write: this is a bug, please report it; "
                 "the client is told to retry, and if the write went through the message "
                 "is found in queue/ and delivered at the next start")
        if error is not None:
            if not answer.done():
                answer.set_exception(error)
            return
        msg = QueuedMessage(queue_id=queue_id, envelope=envelope, state=fresh_state(envelope),
                            size=len(data))
        if self._written is not None:
            try:
                self._written(msg, data)
            except Exception:
                log.exception("spool: could not announce %s; it is delivered after a restart",
                              queue_id)
        else:
            self.adopt(msg, data)
        if not answer.done():
            answer.set_result(queue_id)

    def adopt(self, msg: QueuedMessage, data: bytes | None = None) -> None:
        """Index a message (stored by this or another process), hand it to the listeners.

        ``data``, the stored message bytes if at hand, saves the first attempt a re-read.
        The message is a fresh one, just stored: it has no state file unless save_state()
        wrote one already (the id is then in ``_state_files``).
        """
        if msg.queue_id in self._index:
            return                                  # already known (recovered)
        if data is not None:
            self._fresh.put(msg.queue_id, data)
        self._index[msg.queue_id] = _Entry(msg.envelope.received_at, msg.state.held,
                                           msg.state.next_attempt)
        self._announce(msg)

    def _announce(self, msg: QueuedMessage) -> None:
        queue_id = msg.queue_id
        for callback in self._listeners:
            try:
                callback(msg)
            except Exception:
                log.exception("spool: listener failed for %s; it is delivered after a restart",
                              queue_id)

    async def save_state(self, msg: QueuedMessage) -> None:
        """Replace the message's state file atomically (tmp, fsync, rename, dir fsync).

        Raises KeyError if the message is no longer queued, SpoolError on a write error.
        """
        self._check_id(msg.queue_id)
        self._disk.prepare()
        raw = encode_state(msg.state)
        async with self._locks.hold(msg.queue_id):
            known = msg.queue_id in self._state_files
            self._state_files.add(msg.queue_id)     # before the write: it may get that far
            try:
                await _in_thread(self._disk.write_state, msg.queue_id, raw)
            except KeyError:                        # no message, so no state written
                if not known:
                    self._state_files.discard(msg.queue_id)
                raise
            entry = self._index.get(msg.queue_id)
            if entry is not None:
                entry.held, entry.next_attempt = msg.state.held, msg.state.next_attempt

    async def remove(self, queue_id: str) -> None:
        """Delete a message (delivered, bounced or deleted): state file first, then message.

        The state file's unlink is left out for a message adopted and never given a state.
        The unlinks run in a worker thread, together with the other removals queued at
        the time (``relay.spool.reaper``).
        """
        self._check_id(queue_id)
        self._disk.prepare()
        self._fresh.pop(queue_id)
        async with self._locks.hold(queue_id):
            with_state = queue_id in self._state_files or queue_id not in self._index
            await self._reaper.remove(queue_id, with_state)
            self._index.pop(queue_id, None)
            self._state_files.discard(queue_id)

    # --- the read path -----------------------------------------------------------------------

    async def read_message(self, queue_id: str, *, limit: int | None = None) -> bytes:
        """The raw message bytes (the first ``limit`` of them if given).

        KeyError if not queued, SpoolError if damaged.
        """
        self._check_id(queue_id)
        if limit is None:
            fresh = self._fresh.pop(queue_id)
            if fresh is not None:
                return fresh
        return await _in_thread(self._disk.read_data, queue_id, limit)

    def load(self, queue_id: str) -> QueuedMessage:
        """Envelope and current state of a queued message; KeyError if it is not queued."""
        self._check_id(queue_id)
        try:
            return recovery.read_queued(self.queue, queue_id)
        except FileNotFoundError:
            raise KeyError(queue_id) from None
        except FormatError as exc:
            raise SpoolError(f"queue file {queue_id} is damaged: {exc}",
                             hint="restart relay to move it to corrupt/") from exc
        except OSError as exc:
            raise self._disk.error(f"read {queue_id}", exc, write=False) from exc

    def queue_ids(self) -> list[str]:
        """Ids of all queued messages, oldest first (from the index recover() built)."""
        return sorted(self._index)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._index

    def stats(self, now: float | None = None) -> SpoolStats:
        """Messages by state (held; deferred: next attempt in the future; else active).

        ``oldest_received`` leaves held messages out: an operator's hold is deliberate, and
        the age is what "mail is stuck" alerts watch (held mail has its own count).
        """
        current = time.time() if now is None else now
        counts = {"active": 0, "deferred": 0, "held": 0}
        for e in self._index.values():      # the same rule as layout.state_name
            state = "held" if e.held else "deferred" if e.next_attempt > current else "active"
            counts[state] += 1
        oldest = min((e.received_at for e in self._index.values() if not e.held), default=None)
        return SpoolStats(counts=counts, oldest_received=oldest)

    def update_metrics(self, now: float | None = None) -> SpoolStats:
        """Compute stats() and export them to the queue gauges (call on scrape or a timer)."""
        stats = self.stats(now)
        if self._metrics is not None:
            self._metrics.update_queue(stats.counts, stats.oldest_received, now=now)
        return stats

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _check_id(queue_id: str) -> None:
        if not is_queue_id(queue_id):
            raise KeyError(queue_id)
