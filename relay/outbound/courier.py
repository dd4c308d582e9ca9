"""Couriers: how a message reaches one kind of upstream, with a verdict per recipient.

The deliverer (``relay.outbound.attempt``) decides who relay is toward the provider,
paces and times the attempt; a courier only carries: ``SmtpCourier`` over a pooled
SMTP session, ``OutboxCourier`` into a folder. A new kind of upstream is one new
courier, built for its upstreams in ``relay.outbound.attempt.Deliverer``.

Every recipient ends up with an ``RcptResult``: 2xx delivered; permanent (5xx) bounces;
anything else, including every network, TLS, AUTH or local failure, is transient and
retried. Unknown means transient.

Each courier calls ``handed()`` at its point of no return, the moment after which the
upstream may have the message whatever happens to relay (SMTP: right before the data goes
out after the 354); the deliverer writes it in the spool's handover journal
(``relay.spool.handovers``), so a crash before the outcome is recorded is counted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relay.config.schema import UpstreamConfig
from relay.outbound.session import Credentials
from relay.spool.records import QueuedMessage
from relay.timing import StageTimer


@dataclass(frozen=True, slots=True)
class RcptResult:
    """The verdict for one recipient of one attempt."""

    code: int            # SMTP reply code; 0 when no provider reply (network, TLS, local)
    reply: str           # provider's reply text "550 5.1.1 ..." or a local explanation
    permanent: bool      # True: bounce; False and not ok: retry
    reason: str = ""     # bounded label for metrics ("" for provider replies)
    remote: str = ""     # provider host that answered

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def reply_class(self) -> str:
        return f"{self.code // 100}xx" if self.code else (self.reason or "local")


def transient(reply: str, reason: str) -> RcptResult:
    """A verdict without a provider reply: try again later."""
    return RcptResult(0, reply, False, reason)


class Courier(Protocol):
    """Carries messages to one upstream of its kind."""

    upstream: UpstreamConfig

    async def carry(self, msg: QueuedMessage, data: bytes, recipients: list[str], *,
                    credentials: Credentials, timer: StageTimer,
                    handed: Callable[[], None]) -> dict[str, RcptResult]:
        """One attempt for ``recipients``; a verdict for each. Never raises but for
        cancellation: failures are transient verdicts. Calls ``handed()`` once at the
        point of no return, if reached."""
        ...

    async def close(self) -> None:
        """Release what the courier holds (idle sessions); attempts in flight finish."""
        ...
