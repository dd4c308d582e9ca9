"""Removing finished messages from ``queue/``: off the event loop, many per thread call.

An unlink is blocking I/O like any other. It frees the inode and the file's blocks, and
on a filesystem mounted with ``discard`` it may wait for the device: ext4 without a
journal discards each freed extent synchronously, inside the unlink. Measured on the
main process's event loop in the SMTP bench (1 KB x20, ``perf trace -s`` on the loop's
thread, on such a filesystem): 0.24 ms per unlink on average and 5 ms at worst, 13 % of
the loop's wall time, during which no session was served.

A thread call per message costs a round trip per message (the thread's wake-up, the GIL
handed back and forth, the loop's own wake-up). So removals queue here: one call on the
spool's pool unlinks every removal queued when it starts, and at most ``lanes`` such
calls run at once, so that a slow device does not put every removal behind one. At a
trickle each removal still goes at once, alone; under load they go in batches.

``unlink(queue_id, with_state)`` is the blocking call (``SpoolDisk.unlink``); its
``SpoolError`` reaches only the caller whose removal failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

Unlink = Callable[[str, bool], None]
Run = Callable[..., "asyncio.Future[Any]"]      # fn, *args -> its future (offload.Pool.run)
_Removal = tuple[str, bool, "asyncio.Future[None]"]

LANES = 2                       # unlink calls in flight at once, at most
BATCH = 256                     # removals per call, at most


def unlink_all(unlink: Unlink, batch: list[tuple[str, bool]]) -> list[Exception | None]:
    """In a worker thread: each removal in turn; what each raised (None: removed)."""
    failed: list[Exception | None] = []
    for queue_id, with_state in batch:
        try:
            unlink(queue_id, with_state)
        except Exception as exc:             # handed to that removal's caller only
            failed.append(exc)
        else:
            failed.append(None)
    return failed


class Reaper:
    """Queues removals and runs them in batches on ``run``'s threads."""

    def __init__(self, unlink: Unlink, run: Run, *, lanes: int = LANES,
                 batch: int = BATCH) -> None:
        self._unlink = unlink
        self._run = run
        self._lanes = lanes
        self._batch = batch
        self._queued: list[_Removal] = []
        self._busy = 0                       # calls in flight

    @property
    def queued(self) -> int:
        """Removals waiting for a free lane."""
        return len(self._queued)

    def remove(self, queue_id: str, with_state: bool) -> asyncio.Future[None]:
        """A future done once the message's files are gone (or with the SpoolError)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queued.append((queue_id, with_state, fut))
        if self._busy < self._lanes:
            self._launch()
        return fut

    def _launch(self) -> None:
        batch, self._queued = self._queued[:self._batch], self._queued[self._batch:]
        self._busy += 1
        job = self._run(unlink_all, self._unlink, [(q, s) for q, s, _ in batch])
        job.add_done_callback(partial(self._settle, batch))

    def _settle(self, batch: list[_Removal], job: asyncio.Future[Any]) -> None:
        self._busy -= 1
        if self._queued:
            self._launch()
        exc = job.exception()                # unlink_all catches each; this is the pool
        failed: list[BaseException | None] = [exc] * len(batch) if exc else job.result()
        for (_, _, fut), error in zip(batch, failed, strict=True):
            if fut.done():                   # its caller was cancelled: nobody waits
                continue
            if error is None:
                fut.set_result(None)
            else:
                fut.set_exception(error)
