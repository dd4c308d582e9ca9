"""Fixtures of the queue-tool tests: a spool with messages and a fake scheduler hook."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.envelope import Envelope
from relay.spool.records import QueuedMessage, RcptStatus
from relay.spool.store import Spool


class FakeScheduler:
    """Records the QueueManager's calls; can pretend an attempt is in flight.

    An attempt in flight ends when ``finish(qid)`` is called; like the real scheduler it
    then saves the state it holds (one more attempt), which a hold must not overwrite.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.calls: list[tuple[str, str]] = []
        self._inflight: dict[str, tuple[QueuedMessage, asyncio.Event]] = {}
        self.idle_waited = asyncio.Event()      # someone waits in wait_idle()
        self.waits: dict[str, dict[str, Any]] = {}   # what due messages wait for

    def reschedule(self, queue_id: str) -> None:
        self.calls.append(("reschedule", queue_id))

    def retry_now(self, queue_id: str) -> None:
        self.calls.append(("retry_now", queue_id))

    def waiting(self, queue_id: str) -> dict[str, Any] | None:
        return self.waits.get(queue_id)

    def forget(self, queue_id: str) -> None:
        self.calls.append(("forget", queue_id))

    def in_flight(self, queue_id: str) -> bool:
        return queue_id in self._inflight

    async def wait_idle(self, queue_id: str) -> None:
        self.calls.append(("wait_idle", queue_id))
        entry = self._inflight.get(queue_id)
        if entry is not None:
            self.idle_waited.set()
            await entry[1].wait()

    def start_attempt(self, queue_id: str) -> None:
        self._inflight[queue_id] = (self.spool.load(queue_id), asyncio.Event())

    async def finish(self, queue_id: str) -> None:
        msg, done = self._inflight.pop(queue_id)
        msg.state.attempts += 1
        msg.state.recipients[0].last_reply = "451 4.3.0 try later"
        msg.state.next_attempt = time.time() + 600
        await self.spool.save_state(msg)
        done.set()


@dataclass
class Queue:
    spool: Spool
    ids: list[str] = field(default_factory=list)


DATA = (b"From: Agent <agent@example.com>\r\nTo: cust@example.net\r\nSubject: Your case 42\r\n"
        b"Message-ID: <42@example.com>\r\n\r\nHello\r\n")


@pytest.fixture
async def queue(tmp_path: Path) -> AsyncIterator[Queue]:
    """A spool with a fresh, a deferred (one recipient delivered) and a held message."""
    sp = Spool(tmp_path / "spool")
    sp.recover()
    q = Queue(sp)
    now = time.time()
    for i, rcpts in enumerate((("cust@example.net",), ("a@example.net", "b@example.net"),
                               ("held@example.net",))):
        env = Envelope(sender="agent@example.com", recipients=rcpts, received_at=now - 100 + i,
                       client_ip="10.0.0.5", listener="platform", auth_user="cc1")
        q.ids.append(await sp.store(env, DATA))
    deferred = sp.load(q.ids[1])
    deferred.state.recipients[0].status = RcptStatus.DELIVERED
    deferred.state.recipients[0].last_reply = "250 2.0.0 OK"
    deferred.state.recipients[1].last_reply = "451 4.7.0 greylisted"
    deferred.state.attempts = 1
    deferred.state.next_attempt = now + 300
    await sp.save_state(deferred)
    held = sp.load(q.ids[2])
    held.state.held = True
    await sp.save_state(held)
    yield q
    sp.close()
