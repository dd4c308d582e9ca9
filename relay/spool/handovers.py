"""The handover journal: messages handed to a provider whose outcome is not yet recorded.

Why: between the moment relay passes the point of no return (the last byte of a message
goes to a provider, which may accept it) and the moment the outcome is written in the
spool, a crash of relay (kill -9, the OOM killer) leaves the message queued; the next
start sends it again and the recipient may get it twice (RFC 5321 6.1: at least once).
relay promises that every such possible duplicate is counted in
``relay_delivery_outcome_unknown_total``, but a crashed process counts nothing. So each
handover is written down first (``H <id> <upstream>``) and crossed out once its outcome is
recorded (``S <id>``); the next start counts each message handed, never settled and still
queued, once per upstream, with one warning naming it (``take_over``).

``<spool>/handovers`` is opened once with O_APPEND: small writes (``diskio.write_all``) and no
fsync, as the journal is for process crashes, after which the kernel's page cache still
holds every write. A handover is written at once; the settlements of one turn of the
event loop go in one write at its end (the spool's removals finish in batches), and
before any later handover so that the file keeps their order. A crash inside that turn
can only make the next start count a message whose outcome was recorded: if it is still
queued (a retry), once more as a possible duplicate; if it was removed, not at all.
After a power loss its last lines may be gone, so the count is best effort then; the
message itself is never lost (the spool is fsynced). Once more than ``COMPACT_AFTER``
bytes were written, it is rewritten (``handovers.tmp`` beside it, then rename) with only
the entries still handed. A torn last line or garbage is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Container
from pathlib import Path

from relay.metrics import Metrics
from relay.spool.diskio import write_all

log = logging.getLogger("relay.spool")

FILE = "handovers"
COMPACT_AFTER = 1 << 20          # bytes written since the last rewrite


def read_journal(path: Path) -> dict[str, set[str]]:
    """Queue id -> upstreams of every entry handed and never settled in ``path``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("cannot read the handover journal %s: %s; a message the previous relay "
                  "handed to a provider just before it stopped is sent again without being "
                  "counted in relay_delivery_outcome_unknown_total (check the spool's "
                  "permissions and disk)", path, exc.strerror or exc)
        return {}
    handed: dict[str, set[str]] = {}
    for line in raw.split(b"\n")[:-1]:        # after the last newline: a torn write
        match line.split(b" "):
            case [b"H", qid, upstream] if qid and upstream:
                handed.setdefault(qid.decode("ascii", "replace"), set()).add(
                    upstream.decode("ascii", "replace"))
            case [b"S", qid]:
                handed.pop(qid.decode("ascii", "replace"), None)
            case _:
                pass                          # garbage: never stops a start
    return handed


def take_over(root: Path, queued: Container[str], metrics: Metrics | None = None
              ) -> Handovers:
    """At start-up, before delivery: count and name what a previous process handed over
    and never recorded that is still ``queued``; then a fresh journal for this process."""
    path = root / FILE
    for qid, upstreams in sorted(read_journal(path).items()):
        if qid not in queued:                 # removed: its outcome was recorded
            continue
        if metrics is not None:
            for upstream in upstreams:
                metrics.delivery_outcome_unknown.labels(upstream).inc()
        log.warning("%s: relay stopped after handing it to %s and before recording the "
                    "reply; it stays queued and is sent again, so the recipient may get it "
                    "twice (counted in relay_delivery_outcome_unknown_total)",
                    qid, " and ".join(sorted(upstreams)))
    return Handovers(path)


class Handovers:
    """The journal of this process (one per process, across reloads); not thread-safe."""

    def __init__(self, path: Path, *, compact_after: int = COMPACT_AFTER) -> None:
        self.path = path
        self._compact_after = compact_after
        self._handed: dict[str, set[str]] = {}
        self._fd: int | None = None
        self._written = 0                     # bytes since the last rewrite
        self._failing = False
        self._closed = False
        self._settling: list[str] = []       # settled this turn of the loop, not written
        self._rewrite()                       # starts empty: the past was taken over

    def handed(self, queue_id: str, upstream: str) -> None:
        """``queue_id`` is past the point of no return toward ``upstream``."""
        self._write_settled()                 # first: the file keeps the order of events
        self._handed.setdefault(queue_id, set()).add(upstream)
        self._append(f"H {queue_id} {upstream}\n".encode())

    def settled(self, queue_id: str) -> None:
        """The outcome of ``queue_id`` is recorded in the spool (nothing if never handed);
        written at the end of this turn of the event loop, with the others of the turn."""
        if self._handed.pop(queue_id, None) is None:
            return
        self._settling.append(queue_id)
        if len(self._settling) > 1:
            return                            # the write is already scheduled
        try:
            asyncio.get_running_loop().call_soon(self._write_settled)
        except RuntimeError:                  # no event loop (a command): write now
            self._write_settled()

    def _write_settled(self) -> None:
        if not self._settling:
            return
        lines = "".join(f"S {qid}\n" for qid in self._settling).encode()
        self._settling = []
        self._append(lines)
        if self._written > self._compact_after:
            self._rewrite()

    def close(self) -> None:
        """Stop writing; what is still handed stays in the file for the next start."""
        self._write_settled()
        self._closed = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, line: bytes) -> None:
        self._written += len(line)            # without a file: reopened after as much
        if self._fd is None:
            return
        if self._failing:                     # end whatever a failed write left torn
            line = b"\n" + line
        try:
            write_all(self._fd, line)
        except OSError as exc:
            self._trouble(f"cannot write to it: {exc.strerror or exc}")
            return
        self._fine()

    def _rewrite(self) -> None:
        """Replace the file with the entries still handed; keep appending to the new one."""
        tmp = self.path.with_name(FILE + ".tmp")
        body = b"".join(f"H {qid} {up}\n".encode()
                        for qid, ups in self._handed.items() for up in sorted(ups))
        self._written = 0                     # a failed rewrite is tried after as much again
        if self._closed:
            return
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                         | os.O_CLOEXEC, 0o600)
            try:
                write_all(fd, body)
                os.replace(tmp, self.path)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        except OSError as exc:
            self._trouble(f"cannot rewrite it: {exc.strerror or exc}")
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._fine()

    def _fine(self) -> None:
        if self._failing:
            self._failing = False
            log.info("handover journal %s is written again", self.path)

    def _trouble(self, what: str) -> None:
        if not self._failing:
            self._failing = True
            log.error("handover journal %s: %s; if relay crashes now, a message it had just "
                      "sent may go out twice without being counted in "
                      "relay_delivery_outcome_unknown_total (delivery goes on; check the "
                      "spool's disk and permissions)", self.path, what)
