"""Who may open a connection to a listener (SMTP and the proxy), as Postfix's anvil decides.

Clients are counted per network (``relay.throttle.client_key``: an IPv4 address and an
IPv6 /64 by default, or the listener's prefixes), so hopping addresses inside one network
does not multiply a client's share. A new connection is refused, in this order, when:

- the listener holds ``total`` connections (``TOO_MANY``);
- its network was admitted ``rate`` times in the last minute (``TOO_FAST``);
- its network holds ``per_client`` connections (``TOO_MANY_FROM_CLIENT``);
- the listener is within ``reserve`` slots of full and the network already holds one
  (``RESERVED``): the last slots are kept for networks that hold none, so a few
  addresses holding slow sessions can fill the listener only up to the reserve, and a
  newcomer still gets in.

Limits are passed with each admission, so a reload's new limits apply to the next
connection while the counts of open ones carry on. Memory is bounded: the connection
rate is remembered for at most ``max_tracked`` networks (the least recent forgotten).
``descriptors_for`` raises the process's soft descriptor limit toward what a listener's
limits need.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from relay.config.schema import ListenerConfig
from relay.pickling import pickled_by_fields
from relay.throttle import client_key

TOO_MANY = "too_many_sessions"
TOO_MANY_FROM_CLIENT = "too_many_sessions_from_client"
TOO_FAST = "connection_rate"
RESERVED = "reserved_for_others"
UNAVAILABLE = "admission_unavailable"  # the process that counts did not answer
RATE_WINDOW = 60.0

# The label of each refusal in relay_connections_refused_total{reason}.
METRIC_REASON = {TOO_MANY: "total", TOO_MANY_FROM_CLIENT: "client", TOO_FAST: "rate",
                 RESERVED: "reserve", UNAVAILABLE: "unavailable"}


@pickled_by_fields
@dataclass(frozen=True, slots=True)
class Limits:
    """One listener's admission limits (0 = no limit)."""

    total: int = 0
    per_client: int = 0
    rate: int = 0                      # connections a minute per client network
    reserve: int = 0                   # slots kept for networks holding none
    ipv4_prefix: int = 32
    ipv6_prefix: int = 64

    @classmethod
    def of(cls, cfg: ListenerConfig) -> Limits:
        return cls(total=cfg.max_connections, per_client=cfg.max_connections_per_client,
                   rate=cfg.max_connection_rate_per_client, reserve=cfg.reserve,
                   ipv4_prefix=cfg.client_ipv4_prefix, ipv6_prefix=cfg.client_ipv6_prefix)


class ConnectionCounter:
    """Counts open connections per client network; see the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 max_tracked: int = 10_000) -> None:
        self.total = 0
        self._per: dict[str, int] = {}
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()
        self._clock = clock
        self._max_tracked = max_tracked

    def key(self, addr: str, limits: Limits) -> str:
        """The network ``addr`` is counted in under ``limits``."""
        return client_key(addr, ipv4_prefix=limits.ipv4_prefix, ipv6_prefix=limits.ipv6_prefix)

    def holding(self, key: str) -> int:
        """Open connections of the network ``key``."""
        return self._per.get(key, 0)

    def admit(self, addr: str, limits: Limits) -> tuple[str | None, str]:
        """Take a slot: ``(None, key)``, and give ``key`` back with ``release`` when the
        connection ends; or ``(why, key)`` when refused (nothing to give back)."""
        key = self.key(addr, limits)
        if limits.total and self.total >= limits.total:
            return TOO_MANY, key
        recent = self._recent_of(key) if limits.rate else None
        if recent is not None and len(recent) >= limits.rate:
            return TOO_FAST, key
        held = self._per.get(key, 0)
        if limits.per_client and held >= limits.per_client:
            return TOO_MANY_FROM_CLIENT, key
        if limits.total and held and self.total >= limits.total - limits.reserve:
            return RESERVED, key
        self.total += 1
        self._per[key] = held + 1
        if recent is not None:
            recent.append(self._clock())
        return None, key

    def release(self, key: str) -> None:
        """Give back a slot taken by ``admit``."""
        self.total -= 1
        left = self._per.get(key, 0) - 1
        if left > 0:
            self._per[key] = left
        else:
            self._per.pop(key, None)

    def _recent_of(self, key: str) -> deque[float]:
        """When ``key``'s network was admitted in the last minute (most recent last)."""
        now = self._clock()
        times = self._recent.pop(key, None) or deque()
        while times and now - times[0] >= RATE_WINDOW:
            times.popleft()
        self._recent[key] = times
        while len(self._recent) > self._max_tracked:
            self._recent.popitem(last=False)
        return times


class SharedCounter(Protocol):
    """Admission decided by another process for a listener several processes serve (see
    ``relay.listenproc.anvil``): the session waits for the answer before its greeting."""

    def ask(self, addr: str, limits: Limits) -> tuple[int, asyncio.Future[str | None]]:
        """(the slot to ``release`` when the connection ends, admitted or not; the
        refusal, or None)."""
        ...

    def release(self, slot: int) -> None: ...


Counter = ConnectionCounter | SharedCounter


def descriptors_for(need: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``need`` if the hard limit allows; the soft limit.

    Shells often start processes with a soft limit of 1024 under a hard one of 524288 or
    more, which would cap a proxy at about 500 sessions for no reason; systemd's
    LimitNOFILE sets both.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target
