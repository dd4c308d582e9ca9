"""Pacing: an upstream's quotas (profile rate limits and overrides) as sliding windows.

A quota is at most N messages, recipients or bytes per window, per mailbox (the account
relay logs in as, else the sender) or per upstream (every mailbox together). Quotas only
ever delay a message: ``reserve`` either records the send or says how long to wait and
which limit binds. A store keeps the usage: ``LocalQuotas`` in this process,
``relay.outbound.quota_redis.RedisQuotas`` shared by replicas.

The provider counts a message when it accepts it, which is after relay decided to send
it. So a reservation counts from the moment it is made while the attempt runs, and when
the attempt ends it is counted again from that moment (``settle``): whatever the
delivery took, no window the provider measures holds more than the quota. On top, each
window is kept ``edge_margin`` longer (clock granularity, a provider that counts from
the start of DATA): a 600/min quota never shows 601 in any 60 s at the provider.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from relay.config.schema import ProfileConfig, QuotaConfig, UpstreamConfig

Dimension = Literal["messages", "recipients", "bytes"]
DIMENSIONS: tuple[Dimension, ...] = ("messages", "recipients", "bytes")


def edge_margin(window: float) -> float:
    """How much longer than its window a send stays counted: 0.2 % (0.12 s of a minute),
    at least 10 ms (timer granularity). Sends are counted until their attempt ended, so
    this only absorbs rounding and clocks, not delivery time."""
    return max(0.01, window * 0.002)


@dataclass(frozen=True, slots=True)
class Limit:
    """One quota: at most ``amount`` of ``dimension`` per ``window`` seconds."""

    dimension: Dimension
    amount: int
    window: float
    scope: Literal["mailbox", "upstream"] = "mailbox"
    source: str = ""            # where it comes from: a profile name, or "upstream NAME"

    def describe(self) -> str:
        """``10/min of zendesk-exchange-connector``, ``50 MB per 5 min of ...``."""
        if self.dimension == "bytes":
            mb = self.amount / (1024 * 1024)
            what = f"{mb:g} MB" if mb >= 1 else f"{self.amount} bytes"
        else:
            what = str(self.amount) + (" recipients" if self.dimension == "recipients" else "")
        per = {60.0: "/min", 3600.0: "/hour", 86400.0: "/day"}.get(self.window)
        text = f"{what}{per}" if per else f"{what} per {_span(self.window)}"
        return f"{text} of {self.source}" if self.source else text

    def shared(self, replicas: int) -> Limit:
        """This limit divided among ``replicas`` (a replica's local share; at least 1)."""
        return Limit(self.dimension, max(1, self.amount // max(1, replicas)), self.window,
                     self.scope, self.source)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def limits_for(upstream: UpstreamConfig, profile: ProfileConfig | None) -> tuple[Limit, ...]:
    """An upstream's quotas: its profile's rate limits, overridden or extended by its own
    ``[[upstream.quota]]`` entries (same scope, dimension and window: the entry wins)."""
    found: dict[tuple[str, str, float], Limit] = {}
    if profile is not None:
        for dim, amount, window in (("messages", profile.messages_per_minute, 60.0),
                                    ("bytes", profile.bytes_per_5min, 300.0),
                                    ("recipients", profile.recipients_per_day, 86400.0)):
            if amount is not None:
                found[("mailbox", dim, window)] = Limit(dim, amount, window,  # type: ignore[arg-type]
                                                        "mailbox", profile.name)
    for quota in upstream.quotas:
        for dim, amount in _amounts(quota):
            found[(quota.scope, dim, quota.window)] = Limit(
                dim, amount, quota.window, quota.scope, f"upstream {upstream.name}")
    return tuple(found.values())


def _amounts(quota: QuotaConfig) -> list[tuple[Dimension, int]]:
    out: list[tuple[Dimension, int]] = []
    for dim in DIMENSIONS:
        amount = getattr(quota, dim)
        if amount is not None:
            out.append((dim, int(amount)))
    return out


@dataclass(frozen=True, slots=True)
class Cost:
    """What one send uses: one message, its recipients, its bytes."""

    messages: int = 1
    recipients: int = 1
    bytes: int = 0

    def of(self, dimension: Dimension) -> int:
        return int(getattr(self, dimension))


@dataclass(frozen=True, slots=True)
class Claim:
    """A send to reserve against one key's limits (a mailbox's, or an upstream's)."""

    key: str                    # "UPSTREAM" or "UPSTREAM/MAILBOX"
    limits: tuple[Limit, ...]
    cost: Cost


@dataclass(slots=True)
class Ticket:
    """A reservation made; ``settle`` it when the attempt ends."""

    ids: list[str] = field(default_factory=list)     # in this process's usage
    claims: tuple[Claim, ...] = ()
    shared: str = ""                                 # its name in a shared store


@dataclass(frozen=True, slots=True)
class Verdict:
    """``wait`` 0: reserved (``ticket``); else seconds to wait and the limit that binds."""

    wait: float
    limit: Limit | None = None
    ticket: Ticket | None = None
    key: str = ""


class QuotaStore(Protocol):
    """Where quota usage is kept: ``LocalQuotas``, or Redis for several replicas."""

    async def reserve(self, claims: Sequence[Claim]) -> Verdict:
        """Record the send against every claim, or none of them and say how long to wait."""
        ...

    async def settle(self, ticket: Ticket) -> None:
        """The attempt ended: count its send from now."""
        ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Sent:
    at: float
    cost: Cost
    ident: str = ""


class _Usage:
    """One key's sends: settled ones in time order, reserved ones until they settle."""

    __slots__ = ("inflight", "sent")

    def __init__(self) -> None:
        self.sent: deque[_Sent] = deque()
        self.inflight: dict[str, tuple[Cost, str]] = {}

    def used(self, limit: Limit, now: float) -> int:
        edge = now - limit.window - edge_margin(limit.window)
        total = sum(c.of(limit.dimension) for c, _ in self.inflight.values())
        for s in reversed(self.sent):
            if s.at <= edge:
                break
            total += s.cost.of(limit.dimension)
        return total

    def wait(self, limit: Limit, need: int, now: float) -> float:
        """Seconds until ``need`` more fits under ``limit`` (0: now). One bigger than the
        whole limit goes when nothing else is inside the window: delay, never refuse."""
        used = self.used(limit, now)
        if used == 0 or used + need <= limit.amount:
            return 0.0
        span = limit.window + edge_margin(limit.window)
        edge = now - span
        for s in self.sent:                       # the oldest leave first
            if s.at <= edge:
                continue
            used -= s.cost.of(limit.dimension)
            if used == 0 or used + need <= limit.amount:
                return s.at + span - now
        # what is in flight has to end first: look again soon (an ending attempt wakes too)
        return min(1.0, span)

    def prune(self, now: float, horizon: float) -> None:
        while self.sent and self.sent[0].at <= now - horizon:
            self.sent.popleft()


class LocalQuotas:
    """Quota usage in this process (the default; also a replica's fallback share)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _Usage] = {}
        self._ids = itertools.count(1)
        self._tidied = clock()
        self._horizon = 0.0

    def check(self, claims: Sequence[Claim]) -> Verdict:
        """How long until every claim fits (0: now), without recording anything."""
        now = self._clock()
        worst = Verdict(0.0)
        for claim in claims:
            usage = self._keys.get(claim.key)
            if usage is None:
                continue
            for limit in claim.limits:
                wait = usage.wait(limit, claim.cost.of(limit.dimension), now)
                if wait > worst.wait:
                    worst = Verdict(wait, limit, key=claim.key)
        return worst

    def record(self, claims: Sequence[Claim], ticket: Ticket | None = None, *,
               ident: str = "") -> Ticket:
        """Record a send against every claim (in flight until settled); ``ident`` names
        it in a shared store."""
        ticket = ticket or Ticket(claims=tuple(claims))
        tid = f"l{next(self._ids)}"
        ticket.ids.append(tid)
        for claim in claims:
            if claim.limits:
                self._keys.setdefault(claim.key, _Usage()).inflight[tid] = (claim.cost, ident)
                span = max(lim.window + edge_margin(lim.window) for lim in claim.limits)
                self._horizon = max(self._horizon, span)
        return ticket

    async def reserve(self, claims: Sequence[Claim]) -> Verdict:
        verdict = self.check(claims)
        if verdict.wait > 0:
            return verdict
        return Verdict(0.0, ticket=self.record(claims))

    async def settle(self, ticket: Ticket) -> None:
        self.settle_now(ticket)

    def settle_now(self, ticket: Ticket) -> None:
        now = self._clock()
        for claim in ticket.claims:
            usage = self._keys.get(claim.key)
            if usage is None:
                continue
            for tid in ticket.ids:
                entry = usage.inflight.pop(tid, None)
                if entry is not None:
                    usage.sent.append(_Sent(now, *entry))
        self._tidy(now)

    def assume(self, key: str, at: float, cost: Cost) -> None:
        """Count ``cost`` as sent at ``at`` (what other replicas sent, as last known); never
        written back to a shared store."""
        usage = self._keys.setdefault(key, _Usage())
        i = len(usage.sent)
        while i > 0 and usage.sent[i - 1].at > at:
            i -= 1
        usage.sent.insert(i, _Sent(at, cost))

    def entries(self) -> list[tuple[str, float, Cost, str]]:
        """Every send still inside some window: (key, seconds ago, cost, ident); those in
        flight count as made now. What a shared store is told after it lost track."""
        now = self._clock()
        out: list[tuple[str, float, Cost, str]] = []
        for key, usage in self._keys.items():
            usage.prune(now, self._horizon)
            out += [(key, now - s.at, s.cost, s.ident) for s in usage.sent if s.ident]
            out += [(key, 0.0, cost, ident) for cost, ident in usage.inflight.values()
                    if ident]
        return out

    def _tidy(self, now: float) -> None:
        """Drop what no window can see any more (bounded memory), every minute at most."""
        if now - self._tidied < 60.0:
            return
        self._tidied = now
        for key, usage in list(self._keys.items()):
            usage.prune(now, self._horizon)
            if not usage.sent and not usage.inflight:
                del self._keys[key]

    async def close(self) -> None:
        return None
