"""Rate-limited logging: at most one line per key per interval, then a count of the rest.

For events that can repeat thousands of times a second (accept() failing while the
process is out of file descriptors, a flood of broken handshakes): the first occurrence
is logged at once; later ones within ``interval`` seconds are only counted, and the next
line logged for that key says how many were suppressed since the previous one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    """Logs through ``logger`` at most once per ``interval`` seconds for each key."""

    def __init__(self, logger: logging.Logger, *, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 1000) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> bool:
        """Log ``msg % args`` unless ``key`` was logged less than ``interval`` s ago.

        Returns True when the line was written. A written line that follows suppressed
        ones ends with ``(N more like this in the last S s)``.
        """
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        skipped = self._suppressed.pop(key, 0)
        if last is None and len(self._last) >= self._max_keys:
            self._forget_oldest()
        self._last[key] = now
        if skipped:
            msg += " (%d more like this in the last %.0f s)"
            args = (*args, skipped, now - (last if last is not None else now))
        self.logger.log(level, msg, *args)
        return True

    def suppressed(self, key: str) -> int:
        """Occurrences of ``key`` counted but not logged since its last line."""
        return self._suppressed.get(key, 0)

    def _forget_oldest(self) -> None:
        oldest = min(self._last, key=self._last.__getitem__)
        del self._last[oldest]
        self._suppressed.pop(oldest, None)
