"""The one stage timer: how long each stage of an upstream session took, and which dominated.

Delivery (SMTP sessions), the IMAP/POP3 proxy's upstream login and ``relay check`` all
time their stages with it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

# What the operator reads for each stage in the slow-delivery log line.
_WAITING_FOR = {
    "connect": "connecting to the provider (transport and proxy handshake)",
    "tls": "in the TLS handshake",
    "greeting": "waiting for the provider's greeting and EHLO reply",
    "auth": "authenticating (token fetch included)",
    "envelope": "waiting for the provider's replies to MAIL/RCPT (pipelined: and DATA)",
    "data": "waiting for the provider's reply to DATA",
}


class StageTimer:
    """Accumulates seconds per stage (connect, tls, greeting, auth, envelope, data).

    A stage may be entered several times (e.g. RSET and MAIL both count as envelope);
    durations add up. Uses the monotonic clock.
    """

    def __init__(self) -> None:
        self.stages: dict[str, float] = {}
        self._mark = time.monotonic()

    def lap(self, name: str) -> float:
        """Record the time since the previous lap (or since the timer was made) as ``name``."""
        now = time.monotonic()
        seconds, self._mark = now - self._mark, now
        self.add(name, seconds)
        return seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` body as ``name`` (recorded even if the body raises)."""
        start = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - start)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + max(0.0, seconds)

    @property
    def total(self) -> float:
        """Sum of the recorded stages."""
        return sum(self.stages.values())

    def longest(self) -> tuple[str, float]:
        """The stage that took longest, and its seconds (``("none", 0.0)`` if empty)."""
        if not self.stages:
            return "none", 0.0
        name = max(self.stages, key=lambda n: self.stages[n])
        return name, self.stages[name]

    def describe(self, upstream: str, total: float | None = None) -> str:
        """One sentence: "delivery to office365 took 12.4 s; 11.9 s waiting for ... DATA"."""
        took = self.total if total is None else total
        name, seconds = self.longest()
        what = _WAITING_FOR.get(name, f"in stage {name}")
        return f"delivery to {upstream} took {took:.1f} s; {seconds:.1f} s {what}"

    def summary(self) -> str:
        """Compact ``connect=0.012 tls=0.030 ...`` for debug logs and ``relay check``."""
        return " ".join(f"{n}={s:.3f}" for n, s in self.stages.items())
