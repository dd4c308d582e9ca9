"""A small tmpfs mounted by a test (disk full, read-only spool), always unmounted after it."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import refuse_in_fast_lane


def _mount(*args: str) -> None:
    refuse_in_fast_lane("mount")
    done = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if done.returncode:
        pytest.fail(f"mount {' '.join(args)} failed ({done.stderr.strip()}): the storage "
                    "fault tests need root (or CAP_SYS_ADMIN)", pytrace=False)


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """Mount a ``size`` tmpfs on ``where`` (created) for a ``with`` block."""
    where.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where))
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)


def read_only(where: Path, on: bool = True) -> None:
    """Remount the tmpfs at ``where`` read-only (``on``) or read-write again.

    The kernel refuses ("busy") while a file on it is open for writing.
    """
    _mount("-o", f"remount,{'ro' if on else 'rw'}", str(where))


def fill(path: Path, *, leave: int = 0) -> int:
    """Write ``path`` until its filesystem has about ``leave`` bytes free; bytes written."""
    st = os.statvfs(path.parent)
    want = max(0, st.f_bavail * st.f_frsize - leave)
    written = 0
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        while written < want:
            written += f.write(b"\0" * min(65536, want - written))
    return written
