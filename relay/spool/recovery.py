"""Start-up scan of the spool: clean tmp/, check every queue file, move damaged ones aside.

Never raises for a damaged file: each is moved to ``corrupt/`` (or, read-only, skipped)
with one log line naming the file and what was wrong, and the scan goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from relay.spool.layout import (
    STATE_SUFFIX,
    FormatError,
    MessageFile,
    decode_state,
    fresh_state,
    is_queue_id,
)
from relay.spool.records import QueuedMessage

log = logging.getLogger("relay.spool")


def clean_tmp(tmp: Path) -> None:
    """Remove everything in tmp/: unfinished writes of a process that stopped."""
    for entry in os.scandir(tmp):
        try:
            os.unlink(entry.path)
            log.info("spool: removed unfinished write %s", entry.path)
        except IsADirectoryError:
            log.warning("spool: unexpected directory %s left alone", entry.path)
        except OSError as exc:
            log.warning("spool: cannot remove leftover %s: %s", entry.path, exc.strerror)


def move_aside(path: Path, corrupt: Path, reason: str) -> bool:
    """Rename ``path`` into corrupt/ (never overwriting), logging why; never raises.

    True if it was moved.
    """
    target = corrupt / path.name
    n = 0
    while target.exists():
        n += 1
        target = corrupt / f"{path.name}.{n}"
    try:
        os.rename(path, target)
    except OSError as exc:
        log.error("spool: damaged file %s (%s) could not be moved to %s: %s; it is ignored",
                  path, reason, corrupt, exc.strerror)
        return False
    log.error("spool: moved damaged file %s to %s: %s", path, target, reason)
    return True


def read_queued(queue: Path, name: str, *, with_state: bool = True) -> QueuedMessage:
    """Load one message's envelope (and state) from queue/<name>.

    Raises FileNotFoundError if the message is absent, FormatError if it is damaged, and
    FormatError with ``state`` in its message for a damaged state file.
    """
    fd = os.open(queue / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        mf = MessageFile(fd)
    finally:
        os.close(fd)
    state = fresh_state(mf.envelope)
    if with_state:
        try:
            raw = (queue / (name + STATE_SUFFIX)).read_bytes()
        except FileNotFoundError:
            pass
        else:
            state = decode_state(raw, mf.envelope)
    return QueuedMessage(queue_id=name, envelope=mf.envelope, state=state, size=mf.data_len)


def scan(queue: Path, corrupt: Path | None, *,
         moved: list[str] | None = None) -> list[QueuedMessage]:
    """Every good message in queue/, in id (arrival) order.

    With ``corrupt`` set, damaged files and orphan state files are moved there (and their
    names appended to ``moved``); with ``corrupt=None`` (read-only use by the queue
    tools) they are only logged and skipped.
    A damaged state file next to a good message is moved aside and the message comes
    back fresh: it is delivered again to every recipient (at least once, never lost).
    """
    names = sorted(os.listdir(queue))
    messages = {n for n in names if is_queue_id(n)}
    found: list[QueuedMessage] = []

    def damaged(name: str, reason: str) -> None:
        if corrupt is None:
            log.warning("spool: skipping damaged file %s: %s", queue / name, reason)
        elif move_aside(queue / name, corrupt, reason) and moved is not None:
            moved.append(name)

    for name in names:
        if name in messages:
            continue
        if name.endswith(STATE_SUFFIX) and is_queue_id(name[:-len(STATE_SUFFIX)]):
            if name[:-len(STATE_SUFFIX)] not in messages:
                damaged(name, "state file without its message")
        else:
            damaged(name, "not a spool file name")

    for name in sorted(messages):
        try:
            found.append(read_queued(queue, name, with_state=False))
        except FileNotFoundError:
            continue                      # removed while we scanned (read-only use)
        except FormatError as exc:
            damaged(name, str(exc))
            if (queue / (name + STATE_SUFFIX)).exists():
                damaged(name + STATE_SUFFIX, "its message was damaged")
            continue
        except OSError as exc:
            damaged(name, f"unreadable ({exc.strerror})")
            continue
        msg = found[-1]
        try:
            raw = (queue / (name + STATE_SUFFIX)).read_bytes()
        except FileNotFoundError:
            continue
        except OSError as exc:
            damaged(name + STATE_SUFFIX, f"unreadable ({exc.strerror}); message starts afresh")
            continue
        try:
            msg.state = decode_state(raw, msg.envelope)
        except FormatError as exc:
            damaged(name + STATE_SUFFIX, f"{exc}; message starts afresh")
    return found


def fsync_dirs(*dirs: Path) -> None:
    """Make renames and unlinks in these directories durable (best effort)."""
    for d in dirs:
        with contextlib.suppress(OSError):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
