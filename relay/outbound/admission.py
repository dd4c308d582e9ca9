"""Admission: when the head of a mailbox's line may go, and what it waits for until then.

The scheduler (``relay.outbound.scheduler``) owns the schedule and the attempts; this
owns what stands between a due message and its attempt: the lines
(``relay.outbound.lines``), the provider pauses (``relay.outbound.holds``) that throttle
replies set (``relay.outbound.throttle_table``), the quota store
(``relay.outbound.pacing``), relay's own fail-fast window after a connection failure
(asked of the deliverer), the connections per mailbox and per upstream. ``admit``
checks them in that order and reserves the quotas last, so a line that waits for its
quota holds no connection; then the scheduler's attempt starts with the reservation,
which it settles when the attempt ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from relay.errors import DeliveryError
from relay.metrics import Metrics
from relay.outbound.attempt import Deliverer
from relay.outbound.courier import RcptResult
from relay.outbound.holds import Pauses
from relay.outbound.lines import Line, LineBook, Wait, at
from relay.outbound.pacing import LocalQuotas, QuotaStore, Ticket
from relay.outbound.throttle_table import ThrottleTable
from relay.routing import Router
from relay.spool.records import QueuedMessage, RcptStatus

log = logging.getLogger("relay.pacing")

Groups = dict[str, list[str]]               # upstream -> its pending recipients
Plan = tuple[QueuedMessage, Groups, dict[str, RcptResult], Deliverer]


def route_pending(router: Router, msg: QueuedMessage) -> tuple[Groups, dict[str, RcptResult]]:
    """Pending recipients by upstream; those without a route, with their verdict."""
    groups: Groups = {}
    unrouted: dict[str, RcptResult] = {}
    for rcpt in (r.address for r in msg.state.recipients if r.status is RcptStatus.PENDING):
        try:
            groups.setdefault(router.route(msg.envelope, rcpt), []).append(rcpt)
        except DeliveryError as exc:
            unrouted[rcpt] = RcptResult(0, str(exc), False, exc.reason)
    return groups, unrouted


class Owner(Protocol):
    """What admission needs of the scheduler."""

    def plan(self, queue_id: str) -> Plan | None:
        """The message, its recipients by upstream (and unroutable ones) and the current
        deliverer, if it is still to be sent now; None if not (forgotten, in flight)."""
        ...

    def launch(self, msg: QueuedMessage, groups: Groups, unrouted: dict[str, RcptResult],
               deliverer: Deliverer, line: Line | None, ticket: Ticket | None) -> None:
        """Start the attempt (it gives the connections back and settles the ticket)."""
        ...


class Admission:
    """The lines, the pauses, the quotas: the gate between due and sent."""

    def __init__(self, owner: Owner, *, quotas: QuotaStore | None = None,
                 throttles: ThrottleTable | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._owner = owner
        self._metrics = metrics
        self._clock = clock
        self.quotas: QuotaStore = quotas if quotas is not None else LocalQuotas()
        self.throttles = throttles or ThrottleTable(())
        self.pauses = Pauses(metrics=metrics, clock=clock)
        self.book = LineBook(self, metrics=metrics, clock=clock)

    def join(self, msg: QueuedMessage, groups: Groups, deliverer: Deliverer,
             router: Router) -> None:
        """A due message takes its place in the line of the mailbox that sends it, by
        priority (its route's, else its listener's) then arrival."""
        upstream = min(groups, key=lambda u: (-len(groups[u]), u))   # its main upstream
        route = router.matching_rule(msg.envelope.sender, groups[upstream][0])
        priority = route.priority if route is not None and route.priority is not None \
            else deliverer.priority(msg.envelope.listener)
        self.book.join((upstream, deliverer.mailbox_of(upstream, msg)), msg.queue_id,
                       priority)

    def waiting(self, queue_id: str) -> dict[str, Any] | None:
        """What a due message waits for, in the operator's words (None: it does not)."""
        wait = self.book.waiting(queue_id)
        if wait is None:
            return None
        return {"reason": wait.reason, "until": wait.until, "text": wait.text}

    async def admit(self, line: Line, qid: str) -> Wait | None:
        """The head of ``line`` may go now (its attempt starts), or what it waits for."""
        plan = self._owner.plan(qid)
        if plan is None:
            self.book.leave(qid)
            return None
        msg, groups, unrouted, d = plan
        if not groups:
            self.book.leave(qid)
            self._owner.launch(msg, {}, unrouted, d, None, None)
            return None
        hold = self._held(msg, groups, d)
        if hold is not None:
            self.book.slots.leave(line)          # a paused line holds no connection
            return hold
        cap = d.connections_per_mailbox(line.upstream)
        if cap is not None and line.inflight >= cap:
            self.book.slots.leave(line)
            return Wait("connections", 0.0, f"waiting for a connection: {line.mailbox} has "
                                            f"{cap} to {line.upstream} in use, its limit")
        taken: list[str] = []
        for upstream in sorted(groups):
            if not self.book.slots.take(upstream, d.concurrency(upstream), line):
                for u in taken:
                    self.book.slots.give_back(u)
                return Wait("connections", 0.0, f"waiting for a connection to {upstream} "
                                                f"({d.concurrency(upstream)} in use)")
            taken.append(upstream)
        claims = [c for u, r in groups.items() for c in d.claims(u, msg, len(r))]
        verdict = await self.quotas.reserve(claims)
        again = self._owner.plan(qid)
        if again is None or again[0] is not msg or qid not in line.members or verdict.wait > 0:
            for u in taken:
                self.book.slots.give_back(u)
            if verdict.ticket is not None:            # forgotten while reserving
                await self.quotas.settle(verdict.ticket)
            if verdict.wait <= 0 or verdict.limit is None:
                return None
            whom = (f"for {line.mailbox}" if verdict.limit.scope == "mailbox"
                    else f"for every mailbox of {line.upstream}")
            until = self._clock() + verdict.wait
            return Wait("quota", until, f"waiting for quota: {verdict.limit.describe()} "
                                        f"{whom}, next at {at(until)}")
        joined = self.book.leave(qid)
        if joined is not None and self._metrics is not None:
            self._metrics.pacing_delay.labels(line.upstream).observe(
                max(0.0, self._clock() - joined))
        line.inflight += 1
        self._owner.launch(msg, groups, unrouted, d, line, verdict.ticket)
        return None

    def _held(self, msg: QueuedMessage, groups: Groups, d: Deliverer) -> Wait | None:
        """A provider pause or relay's fail-fast window holding this message back."""
        for upstream in groups:
            pause = self.pauses.holding(upstream, d.mailbox_of(upstream, msg))
            if pause is not None:
                return Wait("paused", pause.until, f"paused by provider until "
                                                   f"{at(pause.until)} ({pause.reply})")
            suspended = d.suspension(upstream, msg)
            if suspended is not None:
                until = self._clock() + suspended[0]
                return Wait("suspended", until, f"waiting for {upstream} to recover after: "
                                                f"{suspended[1]}; next try at {at(until)}")
        return None

    def unhold(self, msg: QueuedMessage, groups: Groups, d: Deliverer) -> None:
        """End the pauses and fail-fast windows holding ``msg`` (an operator's retry)."""
        for upstream in groups:
            mailbox = d.mailbox_of(upstream, msg)
            if self.pauses.clear(upstream, mailbox):
                log.info("%s: the operator's retry ends the provider pause of %s at %s",
                         msg.queue_id, mailbox, upstream)
            d.clear_suspension(upstream)
            self.book.wake(upstream)

    def changed(self, upstream: str, d: Deliverer) -> None:
        """``upstream``'s address, tunnel or credentials changed: its pauses end."""
        self.pauses.clear(upstream)
        d.clear_suspension(upstream)
        self.book.wake(upstream)

    def throttled(self, upstream: str, msg: QueuedMessage, res: RcptResult,
                  d: Deliverer) -> tuple[RcptResult, float]:
        """A reply the throttle table knows: pause, and defer (never bounce) the recipient.
        Returns the verdict to record and the pause's end (0: not a throttle reply)."""
        mailbox = d.mailbox_of(upstream, msg)
        if res.ok:
            self.pauses.delivered(upstream, mailbox)
            return res, 0.0
        throttle = self.throttles.throttle(res.reply, res.code,
                                           repeat=self.pauses.repeat(upstream, mailbox))
        if throttle is None:
            return res, 0.0
        pause = self.pauses.pause(upstream, mailbox, throttle)
        self.book.wake(upstream)
        return RcptResult(res.code, res.reply, False, "throttled", res.remote), pause.until
