"""Open connections of one listener, in total and per client address (SMTP and the proxy).

The limits are passed with each admission, so a reload's new limits apply to the next
connection while the counts of open ones carry on. ``descriptors_for`` raises the
process's soft descriptor limit toward what a listener's limits need.
"""

from __future__ import annotations

import resource

TOO_MANY = "too_many_sessions"
TOO_MANY_FROM_CLIENT = "too_many_sessions_from_client"


class ConnectionCounter:
    """Counts open connections; ``admit`` refuses past the limits (0 = no limit)."""

    def __init__(self) -> None:
        self.total = 0
        self._per: dict[str, int] = {}

    def admit(self, addr: str, *, total: int, per_client: int) -> str | None:
        """Take a slot and return None, or return why not (``TOO_MANY...``)."""
        if total and self.total >= total:
            return TOO_MANY
        if per_client and self._per.get(addr, 0) >= per_client:
            return TOO_MANY_FROM_CLIENT
        self.total += 1
        self._per[addr] = self._per.get(addr, 0) + 1
        return None

    def release(self, addr: str) -> None:
        """Give back a slot taken by ``admit``."""
        self.total -= 1
        left = self._per.get(addr, 0) - 1
        if left > 0:
            self._per[addr] = left
        else:
            self._per.pop(addr, None)


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
