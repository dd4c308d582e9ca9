"""The spool lock: one flock on ``<spool>/lock`` says who owns the spool right now.

The running relay holds it for its whole life; a ``relay queue`` command acting on files
directly holds it for the command's duration. So a second relay on the same spool fails
at start with a clear error, and the queue tools know whether to talk to the control
socket (the lock is held by someone else) or to act on the files themselves.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from types import TracebackType

from relay.errors import SpoolError


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class SpoolLock:
    """An exclusive, non-blocking flock on a lock file; also a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, *, timeout: float = 0.0) -> None:
        """Take the lock or raise SpoolError naming the holder; retry for ``timeout`` s."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SpoolError(f"cannot open the spool lock {self.path}: {exc.strerror}",
                             hint="check that the spool directory exists and that relay "
                                  "may write to it") from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    pid = _read_pid(self.path)
                    who = f"process {pid}" if pid else "another process"
                    raise SpoolError(
                        f"the spool {self.path.parent} is in use by {who} (a running relay "
                        "or a `relay queue` command)",
                        hint="stop the other relay, or give this one its own [relay] spool "
                             "directory; two relays must never share a spool") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)        # closing the only descriptor drops the flock

    def __enter__(self) -> SpoolLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def held_by_other(self) -> bool:
        """True if some other open file description holds the lock right now."""
        if self._fd is not None:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:                 # no lock file (or no spool): nobody holds it
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def holder_pid(self) -> int | None:
        """The pid the holder wrote into the lock file, if any."""
        return _read_pid(self.path)
