"""Per-client-address bookkeeping for the proxy: recent login failures."""

from __future__ import annotations

import time
from collections import deque


class FailureTracker:
    """Failed logins per client address within a sliding window.

    After ``limit`` failures inside ``window`` seconds the address is refused until the
    oldest of them leaves the window. Each failure after the first is answered more
    slowly (``base_delay`` doubling up to ``max_delay``), as a server would.
    """

    def __init__(self, *, limit: int, window: float, base_delay: float = 1.0,
                 max_delay: float = 8.0, max_addresses: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_addresses = max_addresses
        self._fails: dict[str, deque[float]] = {}

    def _recent(self, addr: str, now: float) -> deque[float] | None:
        q = self._fails.get(addr)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._fails[addr]
            return None
        return q

    def count(self, addr: str, now: float | None = None) -> int:
        q = self._recent(addr, time.monotonic() if now is None else now)
        return len(q) if q else 0

    def refused(self, addr: str, now: float | None = None) -> bool:
        return self.limit > 0 and self.count(addr, now) >= self.limit

    def record(self, addr: str, now: float | None = None) -> float:
        """Count a failure; return how long to wait before answering it."""
        now = time.monotonic() if now is None else now
        if len(self._fails) >= self.max_addresses:
            for key in list(self._fails):
                self._recent(key, now)
        q = self._recent(addr, now) or self._fails.setdefault(addr, deque())
        q.append(now)
        n = len(q)
        return 0.0 if n <= 1 else min(self.base_delay * 2 ** (n - 2), self.max_delay)

    def clear(self, addr: str) -> None:
        self._fails.pop(addr, None)
