"""Scheduling time: the monotonic clock says when; the wall clock is only for records.

The wall clock jumps (NTP steps, a VM resumed, an operator's ``date -s``); a schedule
kept in wall-clock time would then fire every retry at once (forward) or stall (back),
and a message's queue lifetime would end early. So the scheduler keeps due times and
ages on ``time.monotonic`` and converts at the edges: a due time it writes to the spool
(``next_attempt``) and reads back after a restart is wall-clock time, and a message's
age starts from its wall-clock ``received_at`` once, when the scheduler first sees it.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class SchedulingClock:
    """Monotonic now, and the conversions to and from the spool's wall-clock records."""

    def __init__(self, *, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.wall = wall
        self.now = monotonic
        self._born: dict[str, float] = {}      # queue id -> monotonic time its age was 0

    def due_from_record(self, next_attempt: float, *, longest: float) -> float:
        """A recorded wall-clock due time as a monotonic one.

        Never more than ``longest`` (the longest backoff) away: a record written before
        the clock was set back must not hold a message for the size of the step.
        """
        wait = next_attempt - self.wall()
        return self.now() + min(max(wait, 0.0), longest)

    def record_of(self, due: float) -> float:
        """A monotonic due time as the wall-clock time to write in the spool."""
        return self.wall() + (due - self.now())

    def age(self, queue_id: str, received_at: float) -> float:
        """Seconds since the message was received, immune to clock steps once seen."""
        born = self._born.get(queue_id)
        if born is None:
            born = self._born[queue_id] = self.now() - max(0.0, self.wall() - received_at)
        return self.now() - born

    def forget(self, queue_id: str) -> None:
        self._born.pop(queue_id, None)
