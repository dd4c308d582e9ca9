"""Pacing: a provider profile's rate limits per mailbox, which only ever delay a message.

Messages per minute, bytes per 5 minutes and recipients per day are sliding windows per
mailbox (the provider username, else the envelope sender). ``RateLimiter.acquire`` waits
until a message fits every window, first come first sent; it never refuses or bounces.

Each window is kept a safety margin longer than the provider's (``margin``: 5 %, at most
10 s): relay counts a message when it starts sending it, the provider when it arrives, a
few seconds later and not always equally late. Without the margin a burst at the edge of
a window (the last of 600 late, the next 600 on time) lands more than 600 in one provider
minute; with it, as long as each message reaches the provider within the margin of its
start, no provider window holds more than the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relay.config.schema import ProfileConfig


def margin(window: float) -> float:
    """How much longer than the provider's ``window`` relay keeps each one."""
    return min(window * 0.05, 10.0)


@dataclass(slots=True)
class _Sent:
    at: float
    size: int
    recipients: int


class _Mailbox:
    __slots__ = ("lock", "log")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()          # FIFO: first come, first sent
        self.log: deque[_Sent] = deque()


class RateLimiter:
    """Per-mailbox sliding windows for a profile's rate limits; ``acquire`` only waits."""

    WINDOWS = (("messages_per_minute", 60.0), ("bytes_per_5min", 300.0),
               ("recipients_per_day", 86400.0))

    def __init__(self, profile: ProfileConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.profile = profile
        self._clock = clock
        self._sleep = sleep
        self._boxes: dict[str, _Mailbox] = {}
        self._horizon = max((w + margin(w) for attr, w in self.WINDOWS
                             if getattr(profile, attr) is not None), default=0.0)

    def delay(self, key: str, *, recipients: int = 1, size: int = 0) -> float:
        """Seconds until a message of this size and recipient count may go (0 = now)."""
        box = self._boxes.get(key)
        if box is None:
            return 0.0
        now = self._clock()
        self._prune(box, now)
        wait = 0.0
        p = self.profile
        for limit, window, need, amount in (
                (p.messages_per_minute, 60.0, 1, lambda s: 1),
                (p.bytes_per_5min, 300.0, size, lambda s: s.size),
                (p.recipients_per_day, 86400.0, recipients, lambda s: s.recipients)):
            if limit is None:
                continue
            window += margin(window)
            inside = [s for s in box.log if s.at > now - window]
            used = sum(amount(s) for s in inside)
            # free the oldest entries until this one fits; one bigger than the whole
            # window goes once the window is empty (delay, never refuse)
            for s in inside:
                if used + need <= limit or used == 0:
                    break
                used -= amount(s)
                wait = max(wait, s.at + window - now)
        return wait

    async def acquire(self, key: str, *, recipients: int = 1, size: int = 0) -> float:
        """Wait until sending fits every window, record it, return the seconds waited."""
        if self._horizon == 0.0:
            return 0.0
        box = self._boxes.setdefault(key, _Mailbox())
        start = self._clock()
        async with box.lock:
            while (wait := self.delay(key, recipients=recipients, size=size)) > 0:
                await self._sleep(wait)
            box.log.append(_Sent(self._clock(), size, recipients))
        return self._clock() - start

    def _prune(self, box: _Mailbox, now: float) -> None:
        while box.log and box.log[0].at <= now - self._horizon:
            box.log.popleft()

    def forget_idle(self) -> None:
        """Drop mailboxes with nothing inside any window (bounded memory)."""
        now = self._clock()
        for key, box in list(self._boxes.items()):
            self._prune(box, now)
            if not box.log and not box.lock.locked():
                del self._boxes[key]
