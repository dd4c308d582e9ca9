"""Delivery outcomes the spool could not record: kept in memory, not sent again, retried.

After an attempt the scheduler writes the message's new state, or removes the message
once every recipient has its verdict. When that write fails (disk full, read-only
filesystem, I/O error) the outcome exists only in memory; scheduling the message again
from its old state on disk would send it twice. So it waits here, out of the schedule,
while recording is retried (every second at first, backing off to a minute): one log
line when it arrives, one when it is recorded, ``relay_delivery_unrecorded_outcomes``
meanwhile. Once recorded, a message with recipients still pending goes back to the
schedule. If relay stops first, each such message is named in the log: the next start
delivers it again from its old state (at least once, never lost).

Every outcome written, at once or later, is ``settled`` (the spool's handover journal,
``relay.spool.handovers``); one still waiting when relay stops is not, so the next start
counts it as a possible duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from relay.errors import RelayError
from relay.metrics import Metrics
from relay.spool.records import QueuedMessage
from relay.tasks import Background

log = logging.getLogger("relay.scheduler")


class RecordSeam(Protocol):
    """What recording needs of ``relay.spool.Spool``."""

    async def save_state(self, msg: QueuedMessage) -> None: ...
    async def remove(self, queue_id: str) -> None: ...


class Unrecorded:
    """Outcomes waiting to be written to the spool, by queue id."""

    def __init__(self, *, spool: RecordSeam, on_recorded: Callable[[QueuedMessage], None],
                 metrics: Metrics | None = None, first: float = 1.0,
                 longest: float = 60.0,
                 settled: Callable[[str], None] | None = None) -> None:
        self._spool = spool
        self._on_recorded = on_recorded
        self._settled = settled          # the handover journal: this outcome is on disk
        self._metrics = metrics
        self._first, self._longest = first, longest
        self._waiting: dict[str, tuple[QueuedMessage, bool]] = {}   # id -> (msg, done)
        self._tasks = Background("delivery records", log)

    def __contains__(self, queue_id: object) -> bool:
        return queue_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    async def record(self, msg: QueuedMessage, *, done: bool) -> bool:
        """Write the outcome now: remove the message (``done``) or save its state.

        True when written (or the message was deleted meanwhile); False when the spool
        refused, and the outcome now waits here.
        """
        try:
            await self._write(msg, done=done)
        except RelayError as exc:
            self._keep(msg, done, exc)
            return False
        return True

    async def _write(self, msg: QueuedMessage, *, done: bool) -> None:
        """Record the outcome (``record`` and ``_flush``); raises RelayError if refused."""
        with contextlib.suppress(KeyError):           # deleted by an operator meanwhile
            if done:
                await self._spool.remove(msg.queue_id)
            else:
                await self._spool.save_state(msg)
        if self._settled is not None:
            self._settled(msg.queue_id)

    def _keep(self, msg: QueuedMessage, done: bool, exc: RelayError) -> None:
        what = "delivered to everyone" if done else "attempted"
        log.error("%s: %s, but the spool cannot record it: %s; kept in memory and not sent "
                  "again, recording is retried (a restart before then sends it again)",
                  msg.queue_id, what, exc)
        self._waiting[msg.queue_id] = (msg, done)
        self._export()
        if all(t.done() for t in self._tasks.pending()):    # one retry loop at a time
            self._tasks.spawn(self._retry(), name="record-outcomes")

    async def _retry(self) -> None:
        delay = self._first
        while self._waiting:
            await asyncio.sleep(delay)
            recorded = await self._flush()
            delay = self._first if recorded else min(delay * 2, self._longest)
            if self._waiting:
                log.debug("%d delivery outcome(s) still unrecorded; next try in %.1f s",
                          len(self._waiting), delay)

    async def _flush(self) -> int:
        """One pass over the waiting outcomes; the number recorded."""
        recorded = 0
        for queue_id, (msg, done) in list(self._waiting.items()):
            if queue_id not in self._waiting:
                continue
            try:
                await self._write(msg, done=done)
            except RelayError:
                continue
            self._waiting.pop(queue_id, None)
            recorded += 1
            log.info("%s: delivery outcome recorded in the spool after all", queue_id)
            if not done:
                self._on_recorded(msg)
        self._export()
        return recorded

    def _export(self) -> None:
        if self._metrics is not None:
            self._metrics.delivery_unrecorded.set(len(self._waiting))

    async def close(self) -> list[str]:
        """Stop retrying after one last pass; the ids still unrecorded (each logged)."""
        await self._tasks.close()
        if self._waiting:
            await self._flush()
        left = sorted(self._waiting)
        for queue_id in left:
            log.error("%s: stopping with its delivery outcome unrecorded: the next start "
                      "delivers it again from its previous state (possible duplicate)",
                      queue_id)
        return left
