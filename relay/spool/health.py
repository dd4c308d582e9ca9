"""Whether the spool can take mail: free space above the reserve, writable, writes succeeding.

Postfix refuses ``MAIL`` while its queue filesystem is short of ``queue_minfree``; relay
does the same with ``[relay] spool_reserve``: below it, new mail is refused with
``452 4.3.1`` before the client sends DATA, so the space left is kept for what relay
must still write (delivery states, bounces). ``check(size)`` answers that question from
``statvfs`` (off the loop, cached for ``ttl`` seconds, the cache debited by each store).

The spool tells this object about every write that succeeds or fails. While the last
write failed, the filesystem is read-only or below the reserve, ``problem()`` names why:
``/readyz`` answers 503 with it and ``relay_spool_writable`` is 0. ``watch()`` (the main
process runs it) re-measures every few seconds and, after a failed write, tries a small
probe write in ``tmp/``, so readiness comes back by itself once the disk is fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relay.metrics import Metrics

log = logging.getLogger("relay.spool")

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
MIN_FREE_INODES = 64              # a message needs two files; keep a few for states and DSNs
PROBE_NAME = ".probe"


@dataclass(frozen=True, slots=True)
class Room:
    """The spool filesystem as statvfs sees it (bytes and inodes relay may use)."""

    free: int
    inodes: int | None               # None: the filesystem has no inode limit (btrfs)
    read_only: bool


@dataclass(frozen=True, slots=True)
class Shortage:
    """Why the spool cannot take a message now; ``full`` is a 452 4.3.1, else a 451 4.3.0."""

    text: str
    full: bool


def measure(root: Path) -> Room:
    """statvfs of the filesystem holding queue/ (blocking: run it in a thread).

    queue/ rather than the spool root: that is where mail is written, and it may be a
    mount of its own (the lock and control socket then stay on the root's filesystem).
    """
    where = root / "queue"
    while not where.is_dir() and where.parent != where:   # not made yet: where it will be
        where = where.parent
    st = os.statvfs(where)
    return Room(free=st.f_bavail * st.f_frsize,
                inodes=st.f_favail if st.f_files else None,
                read_only=bool(st.f_flag & os.ST_RDONLY))


def _mb(n: int) -> str:
    return f"{n / 1048576:.1f} MB"


class SpoolHealth:
    """Free space, read-only state and write failures of one spool directory."""

    def __init__(self, root: Path, *, reserve: int = 0, metrics: Metrics | None = None,
                 ttl: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = Path(root)
        self.reserve = reserve
        self._metrics = metrics
        self._ttl = ttl
        self._clock = clock
        self._room: Room | None = None
        self._measured = float("-inf")
        self._measuring: asyncio.Future[Room] | None = None
        self._failure: str | None = None          # the last write failed: why
        self._reported: str | None = None         # what problem() last logged

    def configure(self, *, reserve: int) -> None:
        """A reload changed ``[relay] spool_reserve``."""
        self.reserve = reserve

    # --- what the spool reports (any thread) ----------------------------------------------

    def write_failed(self, what: str, exc: OSError) -> None:
        self._failure = f"cannot {what}: {exc.strerror or exc}"
        if exc.errno in DISK_FULL:
            self._measured = float("-inf")        # measure again before the next answer

    def write_succeeded(self, size: int = 0) -> None:
        self._failure = None
        room = self._room
        if room is not None and size:
            self._room = Room(max(0, room.free - size), room.inodes, room.read_only)

    # --- questions ------------------------------------------------------------------------

    async def check(self, size: int = 0) -> Shortage | None:
        """None if a message of ``size`` bytes may be stored now, else why not.

        A good measure is reused for ``ttl`` seconds; after a bad one every check
        measures again, so mail is taken again the moment the disk is fixed. When the
        filesystem cannot be measured at all, the store is left to find out.
        """
        bad = self._room is None or self._shortage(self._room, 0) is not None
        room = await self._measure(fresh=bad)
        return self._shortage(room, size)

    def _shortage(self, room: Room | None, size: int) -> Shortage | None:
        if room is None:          # statvfs failed: let the write itself tell
            return None
        if room.read_only:
            return Shortage(f"the spool filesystem of {self.root} is read-only", full=False)
        if room.inodes is not None and room.inodes < MIN_FREE_INODES:
            return Shortage(f"the spool filesystem of {self.root} has {room.inodes} free "
                            "inodes left", full=True)
        if room.free - size < self.reserve:
            need = f" for {_mb(size)} more" if size else ""
            return Shortage(f"the spool filesystem of {self.root} has {_mb(room.free)} free"
                            f"{need}; relay keeps spool_reserve = {_mb(self.reserve)} for "
                            "delivery records and bounces", full=True)
        return None

    def problem(self) -> str | None:
        """Why the spool cannot take mail now (as last measured), or None: for /readyz."""
        if self._failure is not None:
            return f"spool not writable: {self._failure}"
        shortage = self._shortage(self._room, 0) if self._room is not None else None
        return None if shortage is None else f"spool not writable: {shortage.text}"

    # --- measuring -----------------------------------------------------------------------

    async def _measure(self, *, fresh: bool) -> Room | None:
        if not fresh and self._room is not None and \
                self._clock() - self._measured < self._ttl:
            return self._room
        fut = self._measuring
        if fut is None:                           # one statvfs at a time, shared
            fut = self._measuring = asyncio.ensure_future(asyncio.to_thread(measure, self.root))
            fut.add_done_callback(self._measure_done)
        try:
            room = await asyncio.shield(fut)
        except OSError as exc:
            log.debug("spool: statvfs %s failed: %s", self.root, exc)
            self._room = None
            return None
        self._room, self._measured = room, self._clock()
        return room

    def _measure_done(self, fut: asyncio.Future[Room]) -> None:
        self._measuring = None
        if not fut.cancelled():
            fut.exception()                       # retrieved: a waiter may have gone away

    def _probe_write(self) -> None:
        """Blocking: write, sync and remove a small file in tmp/ (is the disk back?)."""
        path = self.root / "tmp" / PROBE_NAME
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"relay spool probe\n")
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(path)
            self.write_failed("write a probe file in tmp/", exc)
            return
        try:
            os.unlink(path)
        except OSError as exc:
            self.write_failed("remove a probe file in tmp/", exc)
            return
        self.write_succeeded()

    async def refresh(self) -> str | None:
        """Measure now (and probe after a failed write); export and log a change; problem()."""
        room = await self._measure(fresh=True)
        if self._failure is not None and room is not None and not room.read_only:
            await asyncio.to_thread(self._probe_write)
        problem = self.problem()
        if self._metrics is not None:
            self._metrics.spool_writable.set(0 if problem else 1)
            if self._room is not None:
                self._metrics.spool_free_bytes.set(self._room.free)
        if problem != self._reported:
            if problem is not None:
                log.error("%s; new mail is refused with a 4xx and delivery records wait in "
                          "memory until it is fixed\n  hint: free space on that filesystem (or "
                          "lower [relay] spool_reserve), or repair it: see the kernel log; "
                          "relay notices by itself", problem)
            elif self._reported is not None:
                log.info("spool %s is writable again", self.root)
            self._reported = problem
        return problem

    async def watch(self, interval: float = 2.0) -> None:
        """Refresh every ``interval`` seconds, forever (a background task of the main process)."""
        while True:
            await self.refresh()
            await asyncio.sleep(interval)
