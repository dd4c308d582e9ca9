"""The one login-failure throttle: growing delays, then refusal, per client network.

Used by SMTP AUTH and by the IMAP/POP3 proxy's logins alike. The first failure of a
client is answered at once; each further failure within ``window`` seconds waits
``base_delay * 2**(k-2)`` (capped at ``max_delay``) before its reply, as servers do to
slow down guessing. At ``limit`` failures the client is refused for ``window`` seconds.
A success clears the client's failures. IPv6 clients are counted per /64 (a host
usually holds a whole /64, and hopping addresses inside it must not reset the count).
Memory is bounded: the least recently failing clients are forgotten first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable


def client_key(addr: str) -> str:
    """The unit a client is counted in: its IPv4 address, or its IPv6 /64."""
    if addr.startswith("::ffff:"):
        addr = addr[7:]
    if ":" in addr:
        with contextlib.suppress(ValueError):
            return str(ipaddress.ip_network(f"{addr}/64", strict=False))
    return addr


class FailureThrottle:
    """Failed logins per client network; see the module docstring."""

    def __init__(self, *, limit: int, window: float, base_delay: float = 1.0,
                 max_delay: float = 8.0, max_tracked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._max_tracked = max_tracked
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._blocked: dict[str, float] = {}

    def configure(self, *, limit: int, window: float) -> None:
        """New limits (reload); what clients already earned is kept."""
        self.limit, self.window = limit, window

    def blocked(self, addr: str) -> bool:
        """True while ``addr``'s network is refused after reaching the limit."""
        key = client_key(addr)
        until = self._blocked.get(key)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._blocked[key]
        return False

    def failures(self, addr: str) -> int:
        """Failures of ``addr``'s network still inside the window."""
        times = self._failures.get(client_key(addr))
        if not times:
            return 0
        now = self._clock()
        return sum(1 for t in times if now - t <= self.window)

    def failure(self, addr: str) -> tuple[float, bool]:
        """Record a failure: (seconds to wait before replying, now refused?)."""
        key = client_key(addr)
        now = self._clock()
        times = self._failures.pop(key, None) or deque()
        while times and now - times[0] > self.window:
            times.popleft()
        times.append(now)
        self._failures[key] = times
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
        count = len(times)
        if self.limit and count >= self.limit:
            self._blocked[key] = now + self.window
            self._failures.pop(key, None)
            if len(self._blocked) > self._max_tracked:
                for stale in [k for k, t in self._blocked.items() if t <= now]:
                    del self._blocked[stale]
            return 0.0, True
        if count < 2:
            return 0.0, False
        return min(self.base_delay * 2 ** (count - 2), self.max_delay), False

    def success(self, addr: str) -> None:
        self._failures.pop(client_key(addr), None)
