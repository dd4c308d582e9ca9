"""Provider pauses: a throttle reply pauses one mailbox or a whole upstream until a time.

A pause is kept per ``(upstream, mailbox)``, or ``(upstream, None)`` for the whole
upstream. Throttles in a row double the pause (``repeat``); a delivery that succeeds
for the mailbox ends the run. Pauses outlive a reload (the provider's memory does not
change with relay's config) unless the upstream itself changed; an operator's
``relay queue retry`` clears them. Each pause is counted and logged once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from relay.metrics import Metrics
from relay.outbound.throttle_table import Throttle

log = logging.getLogger("relay.pacing")

PauseKey = tuple[str, str | None]          # (upstream, mailbox); None: the whole upstream


@dataclass(slots=True)
class Pause:
    until: float                # wall clock
    reply: str
    rule: str
    repeat: int = 1


class Pauses:
    """The pauses in force, by upstream and mailbox."""

    def __init__(self, *, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._metrics = metrics
        self._clock = clock
        self._pauses: dict[PauseKey, Pause] = {}
        self._runs: dict[PauseKey, int] = {}       # throttles in a row (ended by a success)

    def repeat(self, upstream: str, mailbox: str | None) -> int:
        """Which throttle in a row the next one would be (1: the first)."""
        return self._runs.get((upstream, mailbox), 0) + 1

    def pause(self, upstream: str, mailbox: str, throttle: Throttle) -> Pause:
        """Pause the mailbox (or, by the rule's action, the upstream) after a throttle."""
        key: PauseKey = (upstream, mailbox if throttle.scope == "mailbox" else None)
        self._runs[key] = self._runs.get(key, 0) + 1
        until = self._clock() + throttle.seconds
        current = self._pauses.get(key)
        if current is not None and current.until >= until:
            return current                     # several recipients of one reply: once
        pause = Pause(until, throttle.reply, throttle.rule.name, self._runs[key])
        self._pauses[key] = pause
        who = f"mailbox {mailbox}" if key[1] is not None else "every mailbox"
        log.info("%s: %s paused by the provider for %.0f s, until %s (throttle reply %r, "
                 "rule %s%s); no mail is bounced, it waits", upstream, who, throttle.seconds,
                 time.strftime("%H:%M:%S", time.localtime(until)), throttle.reply,
                 throttle.rule.name, f", {pause.repeat} in a row" if pause.repeat > 1 else "")
        if self._metrics is not None:
            self._metrics.provider_pauses.labels(upstream, throttle.scope,
                                                 throttle.rule.name).inc()
        return pause

    def delivered(self, upstream: str, mailbox: str) -> None:
        """A delivery succeeded: throttles in a row start over."""
        self._runs.pop((upstream, mailbox), None)
        self._runs.pop((upstream, None), None)

    def holding(self, upstream: str, mailbox: str) -> Pause | None:
        """The pause that holds this mailbox's mail now (the later of the two), if any."""
        now = self._clock()
        found: Pause | None = None
        for key in ((upstream, None), (upstream, mailbox)):
            pause = self._pauses.get(key)
            if pause is None:
                continue
            if pause.until <= now:
                del self._pauses[key]
                continue
            if found is None or pause.until > found.until:
                found = pause
        return found

    def clear(self, upstream: str, mailbox: str | None = None) -> bool:
        """End the pauses of a mailbox and of its upstream (or every pause of the upstream
        when ``mailbox`` is None); True if one was in force."""
        keys = [k for k in self._pauses if k[0] == upstream
                and (mailbox is None or k[1] in (None, mailbox))]
        for k in keys:
            del self._pauses[k]
            self._runs.pop(k, None)
        return bool(keys)
