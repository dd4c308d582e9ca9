"""The scheduler: delivers due messages through per-mailbox lines, backs off, gives up.

New messages (the spool's listener callback) are due at once; failed ones wait
``first * 2**(n-1)`` seconds (capped at ``max``, +/- ``jitter``), never past the
message's lifetime, after which the remaining recipients are bounced. After each
attempt the state is saved atomically, or the message removed when every recipient is
delivered or bounced. Held messages are never attempted.

A due message joins its mailbox's line, which lets it go when nothing holds it back
(``relay.outbound.admission``: provider pauses, the fail-fast window after a connection
failure, connection caps, quotas reserved before the attempt and settled when it ends).
Waiting is never an attempt. A throttle reply, even a 5xx, never bounces: the recipient
is deferred and its mailbox (or the upstream) paused. An operator's retry and a reload
that changes an upstream end the pauses and the fail-fast window and try at once;
quotas are never bypassed.

Due times and queue ages run on the monotonic clock (``relay.outbound.clock``): a step
of the wall clock neither fires every retry at once nor ends a lifetime early. An
outcome the spool cannot record waits in memory (``relay.outbound.ledger``), out of the
schedule, so it is never sent again from its stale state while relay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import logging
import random
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

from relay.config.schema import RetryConfig
from relay.envelope import Envelope
from relay.errors import RelayError
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.outbound.admission import Admission, Groups, Plan, route_pending
from relay.outbound.attempt import Deliverer
from relay.outbound.clock import SchedulingClock
from relay.outbound.courier import RcptResult
from relay.outbound.dsn import Bouncer
from relay.outbound.ledger import Unrecorded
from relay.outbound.lines import Line
from relay.outbound.outcomes import Outcomes
from relay.outbound.pacing import QuotaStore, Ticket
from relay.outbound.smtp_courier import SUSPENDED
from relay.outbound.throttle_table import ThrottleTable
from relay.routing import Router
from relay.spool.handovers import Handovers
from relay.spool.records import QueuedMessage
from relay.tasks import Background

log = logging.getLogger("relay.scheduler")


class SpoolSeam(Protocol):
    """What the scheduler needs of ``relay.spool.Spool``."""

    async def read_message(self, queue_id: str) -> bytes: ...
    async def save_state(self, msg: QueuedMessage) -> None: ...
    async def remove(self, queue_id: str) -> None: ...
    async def store(self, envelope: Envelope, data: bytes) -> str: ...
    def load(self, queue_id: str) -> QueuedMessage: ...


class Scheduler:
    """Owns the delivery schedule; only the app creates it (see CONTRIBUTING.md seams)."""

    def __init__(self, *, spool: SpoolSeam, router: Router, deliverer: Deliverer,
                 retry: RetryConfig, maillog: MailLog, bouncer: Bouncer,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.time,
                 rng: Callable[[], float] = random.random, quotas: QuotaStore | None = None,
                 throttles: ThrottleTable | None = None,
                 monotonic: Callable[[], float] = time.monotonic,
                 handovers: Handovers | None = None) -> None:
        self._spool = spool
        self._router, self._deliverer, self._retry = router, deliverer, retry
        self._time = SchedulingClock(wall=clock, monotonic=monotonic)
        self._clock = self._time.now          # when things are due: monotonic
        self._unrecorded = Unrecorded(spool=spool, metrics=metrics, on_recorded=self._recorded,
                                      first=min(1.0, retry.first),
                                      settled=handovers.settled if handovers else None)
        self._msgs: dict[str, QueuedMessage] = {}       # scheduled (not held, not forgotten)
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._reload_after: set[str] = set()
        self._bypass: set[str] = set()            # retried by an operator: try at once
        self._gate = Admission(self, quotas=quotas, throttles=throttles, metrics=metrics,
                               clock=clock)
        self._outcomes = Outcomes(gate=self._gate, time=self._time, maillog=maillog,
                                  bouncer=bouncer, metrics=metrics, rng=rng)
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._side = Background("scheduler", log)

    # ---- the seam ----------------------------------------------------------------------

    async def start(self, recovered: list[QueuedMessage]) -> None:
        """Schedule the recovered queue and start the dispatch loop."""
        for msg in recovered:
            self._schedule(msg, self._from_record(msg))
        self._runner = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    def enqueue(self, msg: QueuedMessage) -> None:
        """Spool listener callback: a new message, due now."""
        self._schedule(msg, 0.0)

    def reschedule(self, queue_id: str) -> None:
        """Re-read the state from the spool (after retry/release) and schedule it."""
        if queue_id in self._inflight:
            self._reload_after.add(queue_id)
            return
        self._spawn(self._reload(queue_id))

    def retry_now(self, queue_id: str) -> None:
        """An operator's retry: like ``reschedule``, and the provider's pause and relay's
        fail-fast window for its mailbox and upstream end, so it is tried at once."""
        self._bypass.add(queue_id)
        msg = self._msgs.get(queue_id)
        if msg is not None:
            self._gate.unhold(msg, self._route(msg)[0], self._deliverer)
        self.reschedule(queue_id)

    def forget(self, queue_id: str) -> None:
        """Drop from the schedule (hold/delete); an attempt in flight still finishes."""
        self._msgs.pop(queue_id, None)
        self._due.pop(queue_id, None)
        self._reload_after.discard(queue_id)
        self._gate.book.leave(queue_id)
        self._time.forget(queue_id)

    def waiting(self, queue_id: str) -> dict[str, Any] | None:
        """What a due message waits for, in the operator's words (None: it does not)."""
        return self._gate.waiting(queue_id)

    def in_flight(self, queue_id: str) -> bool:
        return queue_id in self._inflight

    async def wait_idle(self, queue_id: str) -> None:
        """Wait until an attempt in flight for ``queue_id`` has ended (however it ended).

        The attempt's own failure or cancellation is not the caller's: it is swallowed.
        The caller's cancellation is not: it propagates, and the attempt goes on.
        """
        task = self._inflight.get(queue_id)
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and me.cancelling():
                raise
        except Exception:
            pass                   # the attempt's outcome is recorded by the attempt itself

    async def stop(self, *, grace: float) -> None:
        """Start no new attempts; let current ones finish for ``grace`` s, then cancel."""
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        await self._gate.book.close()
        tasks = list(self._inflight.values()) + self._side.pending()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("stopping: %d delivery attempt(s) cancelled after %.0f s grace; "
                            "they are retried after restart", len(pending), grace)
                await asyncio.wait(pending)
        await self._unrecorded.close()

    def reconfigure(self, *, router: Router, deliverer: Deliverer, retry: RetryConfig,
                    throttles: ThrottleTable | None = None,
                    changed: Iterable[str] = ()) -> None:
        """New attempts use these; attempts in flight finish with the old ones. Deferred
        mail of each ``changed`` upstream is due at once, its pauses cleared."""
        self._router, self._deliverer, self._retry = router, deliverer, retry
        if throttles is not None:
            self._gate.throttles = throttles
        for upstream in changed:
            self.retry_upstream(upstream)
        self._gate.book.wake()
        self._wake.set()

    def retry_upstream(self, upstream: str) -> int:
        """Every deferred message with recipients for ``upstream`` is due now, and the
        upstream's pauses and fail-fast window end (its address, tunnel or credentials
        changed). Returns how many were rescheduled."""
        self._gate.changed(upstream, self._deliverer)
        now = self._clock()
        later = [m for q, due in list(self._due.items()) if due > now
                 and (m := self._msgs.get(q)) is not None and upstream in self._route(m)[0]]
        for msg in later:
            self._schedule(msg, 0.0)
        if moved := len(later):
            log.info("%s changed: %d deferred message(s) for it are due now", upstream, moved)
        return moved

    def update_metrics(self) -> None:
        """Waiting messages by upstream and reason (called before a metrics scrape)."""
        self._gate.book.update_metrics(self._deliverer.upstream_names())

    # ---- scheduling ------------------------------------------------------------------------

    def scheduled(self) -> dict[str, float]:
        """Queue id -> due time (Unix time) of every scheduled message (tests, tools)."""
        return {qid: self._time.record_of(due) for qid, due in self._due.items()}

    def _from_record(self, msg: QueuedMessage) -> float:
        longest = self._retry.max * (1.0 + self._retry.jitter)
        return self._time.due_from_record(msg.state.next_attempt, longest=longest)

    def _recorded(self, msg: QueuedMessage) -> None:
        """The ledger wrote a delayed outcome with recipients still pending: schedule it."""
        if not self._stopping:
            self._schedule(msg, self._from_record(msg))

    def _schedule(self, msg: QueuedMessage, due: float) -> None:
        if msg.queue_id in self._unrecorded:   # its state on disk is stale: never from it
            return
        if msg.state.held or self._stopping:
            self.forget(msg.queue_id)
            return
        self._msgs[msg.queue_id] = msg
        self._due[msg.queue_id] = due
        self._time.age(msg.queue_id, msg.envelope.received_at)     # its age counts from here
        heapq.heappush(self._heap, (due, next(self._seq), msg.queue_id))
        self._wake.set()

    async def _reload(self, queue_id: str) -> None:
        try:
            msg = await asyncio.to_thread(self._spool.load, queue_id)
        except KeyError:
            self.forget(queue_id)
            return
        except RelayError as exc:
            log.error("%s: cannot reload state: %s", queue_id, exc)
            return
        if queue_id in self._bypass:
            self._bypass.discard(queue_id)
            self._gate.unhold(msg, self._route(msg)[0], self._deliverer)
        self._schedule(msg, self._from_record(msg))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._side.spawn(coro, name="reload-state")

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                due, _, qid = heapq.heappop(self._heap)
                if self._due.get(qid) == due and qid not in self._inflight:
                    self._dispatch(qid)
            timeout = min(self._heap[0][0] - now, 60.0) if self._heap else 60.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._wake.wait()

    def _route(self, msg: QueuedMessage) -> tuple[Groups, dict[str, RcptResult]]:
        return route_pending(self._router, msg)

    def _dispatch(self, qid: str) -> None:
        """A message is due: it joins its mailbox's line (or, with nothing to send to an
        upstream, its unroutable recipients are recorded at once)."""
        msg = self._msgs.get(qid)
        if msg is None:
            return
        self._due.pop(qid, None)
        groups, unrouted = self._route(msg)
        if not groups:
            self.launch(msg, {}, unrouted, self._deliverer, None, None)
            return
        self._gate.join(msg, groups, self._deliverer, self._router)

    def plan(self, queue_id: str) -> Plan | None:
        """For admission: what to send now, or None (forgotten, in flight, due later)."""
        msg = self._msgs.get(queue_id)
        if (msg is None or queue_id in self._inflight or queue_id in self._due
                or self._stopping):
            return None
        groups, unrouted = self._route(msg)
        return msg, groups, unrouted, self._deliverer

    def launch(self, msg: QueuedMessage, groups: Groups, unrouted: dict[str, RcptResult],
               deliverer: Deliverer, line: Line | None, ticket: Ticket | None) -> None:
        qid = msg.queue_id
        self._due.pop(qid, None)
        task = asyncio.get_running_loop().create_task(
            self._attempt(msg, groups, unrouted, deliverer, line, ticket), name=f"deliver {qid}")
        self._inflight[qid] = task
        task.add_done_callback(functools.partial(self._attempt_done, qid))

    def _attempt_done(self, qid: str, task: asyncio.Task[None]) -> None:
        self._inflight.pop(qid, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: delivery attempt failed unexpectedly", qid,
                      exc_info=task.exception())
        if qid in self._reload_after:
            self._reload_after.discard(qid)
            if not self._stopping:
                self._spawn(self._reload(qid))
        elif qid in self._due:     # due again before its attempt ended: the heap skipped it
            heapq.heappush(self._heap, (self._due[qid], next(self._seq), qid))
            self._wake.set()

    # ---- one attempt -------------------------------------------------------------------------

    async def _attempt(self, msg: QueuedMessage, groups: Groups,
                       unrouted: dict[str, RcptResult], deliverer: Deliverer,
                       line: Line | None, ticket: Ticket | None) -> None:
        qid = msg.queue_id
        released: set[str] = set()
        try:
            try:
                data = await self._spool.read_message(qid)
            except KeyError:
                self.forget(qid)
                return
            except RelayError as exc:
                log.error("%s: cannot read the queued message: %s (hint: %s)", qid, exc,
                          exc.hint)
                self._retry_later(msg)
                return

            async def one(upstream: str, rcpts: list[str]) -> dict[str, RcptResult]:
                try:
                    return await deliverer.deliver(upstream, msg, data, rcpts)
                finally:
                    released.add(upstream)
                    self._gate.book.slots.give_back(upstream)

            outcomes = await asyncio.gather(*(one(u, r) for u, r in groups.items()))
            results: dict[str, tuple[str, RcptResult]] = {
                r: ("", res) for r, res in unrouted.items()}
            for upstream, outcome in zip(groups, outcomes, strict=True):
                results.update({r: (upstream, res) for r, res in outcome.items()})
            if results and all(res.reason == SUSPENDED for _, res in results.values()):
                self._schedule(msg, 0.0)        # held back by the fail-fast window: waits
                return
            due = await self._outcomes.apply(msg, data, results, retry=self._retry,
                                             deliverer=self._deliverer)
            if due is None:                      # every recipient delivered or bounced
                self.forget(qid)
                await self._unrecorded.record(msg, done=True)
            elif (await self._unrecorded.record(msg, done=False) and qid in self._msgs
                  and not self._stopping):       # recorded, and not held or deleted meanwhile
                self._schedule(msg, due)
        except Exception:
            # Never lose track of a message: log, and try again after the longest backoff.
            log.exception("%s: delivery attempt failed unexpectedly", qid)
            self._retry_later(msg)
        finally:
            for upstream in groups:
                if upstream not in released:
                    self._gate.book.slots.give_back(upstream)
            if line is not None:
                self._gate.book.ended(line)
            if ticket is not None:
                await self._gate.quotas.settle(ticket)

    def _retry_later(self, msg: QueuedMessage) -> None:
        if msg.queue_id in self._msgs and not self._stopping:
            self._schedule(msg, self._clock() + self._retry.max)
