"""An attempt's results turned into the message's new state: delivered, deferred, bounced.

For each recipient an attempt tried, ``Outcomes.apply`` records the verdict (a throttle
reply becomes a deferral and a pause of the mailbox or upstream: ``relay.outbound.
admission``), writes the mail-log line and counts it, bounces what failed for good or
outlived the queue lifetime (one DSN for the attempt: ``relay.outbound.dsn``) and says
when the message is due again: after the backoff, at once when a pause holds it (its
line waits for the pause), never past its lifetime. Writing the new state to the spool
and scheduling it stay with ``relay.outbound.scheduler``, which owns the schedule.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

from relay.config.schema import RetryConfig
from relay.errors import RelayError
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.outbound.admission import Admission
from relay.outbound.attempt import Deliverer
from relay.outbound.clock import SchedulingClock
from relay.outbound.courier import RcptResult
from relay.outbound.dsn import Bouncer, Failure
from relay.spool.records import QueuedMessage, RcptStatus

log = logging.getLogger("relay.scheduler")


def backoff(retry: RetryConfig, attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1-based), with jitter."""
    base = min(retry.first * float(2 ** max(0, min(attempts - 1, 40))), retry.max)
    return max(0.0, base * (1.0 + retry.jitter * (2.0 * rng() - 1.0)))


class Outcomes:
    """Applies attempts' results to their messages (the scheduler's, one per attempt)."""

    def __init__(self, *, gate: Admission, time: SchedulingClock, maillog: MailLog,
                 bouncer: Bouncer, metrics: Metrics | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        self._gate, self._time = gate, time
        self._maillog, self._bouncer, self._metrics = maillog, bouncer, metrics
        self._rng = rng

    async def apply(self, msg: QueuedMessage, data: bytes,
                    results: dict[str, tuple[str, RcptResult]], *, retry: RetryConfig,
                    deliverer: Deliverer) -> float | None:
        """Record verdicts, log them, bounce what failed; the monotonic time the message
        is due again (its ``next_attempt`` set), or None when every recipient is done."""
        qid, state, now = msg.queue_id, msg.state, self._time.now()
        age = self._time.age(qid, msg.envelope.received_at)
        delay = f"{age:.2f}"
        failures: list[tuple[Failure, str]] = []
        last_error = ""
        paused = 0.0
        for rcpt in state.recipients:
            if rcpt.address not in results:
                continue
            upstream, res = results[rcpt.address]
            if upstream:
                res, until = self._gate.throttled(upstream, msg, res, deliverer)
                paused = max(paused, until)
            rcpt.attempts += 1
            rcpt.last_reply = res.reply
            if res.ok:
                rcpt.status = RcptStatus.DELIVERED
                self._maillog.delivered(qid, to=f"<{rcpt.address}>", upstream=upstream,
                                        delay=delay, reply=res.reply)
                self._count("delivered", upstream, res)
            elif res.permanent:
                failures.append((Failure(rcpt.address, res.reply, res.remote), upstream))
            else:
                last_error = res.reply
                self._maillog.deferred(qid, to=f"<{rcpt.address}>", upstream=upstream or None,
                                       delay=delay, reply=res.reply)
                self._count("deferred", upstream, res)
        state.attempts += 1
        state.last_attempt = self._time.wall()
        state.upstream = ",".join(sorted({u for u, _ in results.values() if u}))
        if last_error:
            state.last_error = last_error
        if age >= retry.lifetime:
            for rcpt in state.recipients:
                if rcpt.status is RcptStatus.PENDING and rcpt.address in results:
                    reason = rcpt.last_reply or "no delivery attempt succeeded"
                    failures.append((Failure(rcpt.address, f"{reason} (gave up after "
                                             f"{retry.lifetime / 3600:.0f} h in the queue)",
                                             expired=True), results[rcpt.address][0]))
        if failures:
            await self._bounce(msg, data, failures)
        if not any(r.status is RcptStatus.PENDING for r in state.recipients):
            return None
        due = now + backoff(retry, state.attempts, self._rng)
        if paused:                     # throttled: its line waits for the pause, not backoff
            due = now
        due = min(due, now + max(retry.lifetime - age, 1.0))
        state.next_attempt = self._time.record_of(due)
        return due

    async def _bounce(self, msg: QueuedMessage, data: bytes,
                      failures: list[tuple[Failure, str]]) -> None:
        qid = msg.queue_id
        try:
            dsn_id = await self._bouncer.bounce(msg, [f for f, _ in failures], data)
        except RelayError as exc:
            # Keep them pending: the DSN is tried again at the next attempt.
            log.error("%s: cannot queue the bounce: %s (hint: %s)", qid, exc, exc.hint)
            return
        by_addr = {r.address: r for r in msg.state.recipients}
        for failure, upstream in failures:
            rcpt = by_addr[failure.recipient]
            rcpt.status = RcptStatus.BOUNCED
            rcpt.last_reply = failure.reply
            self._maillog.bounced(qid, to=f"<{failure.recipient}>", upstream=upstream or None,
                                  status=failure.status, reply=failure.reply,
                                  dsn=dsn_id or "none (bounce of a bounce)")
            if self._metrics is not None:
                first = failure.reply[:1]
                cls = ("expired" if failure.expired else f"{first}xx" if first.isdigit()
                       else "local")
                self._metrics.messages_bounced.labels(upstream or "none", cls).inc()

    def _count(self, verdict: str, upstream: str, res: RcptResult) -> None:
        if self._metrics is None:
            return
        counter = (self._metrics.messages_delivered if verdict == "delivered"
                   else self._metrics.messages_deferred)
        counter.labels(upstream or "none", res.reply_class).inc()
