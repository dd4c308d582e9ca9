"""The throttle-reply table applied: which provider reply means "slow down", and for how long.

The rows are data (``relay/data/throttle_replies.toml``, read by ``relay.config.pacing``); this
module matches a reply against them (code, enhanced status prefix, text) and works out
the pause: the time the reply itself names ("try again in 5 minutes", "retry after 30
seconds"), else the row's ``pause`` doubled for each throttle in a row, at most
``max_pause``. A match is never a bounce: the scheduler pauses the mailbox or upstream
and the message waits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config.schema import ThrottleReplyConfig

_CODE = re.compile(r"^\s*([2-5]\d\d)[ -]")
_STATUS = re.compile(r"^\s*[2-5]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hr": 3600.0, "hour": 3600.0}
# "try again in 5 minutes", "retry after 30 seconds", "wait 2 min", "in 1 hour"
_NAMED = re.compile(r"(?:try again|retry|wait|resume)\D{0,20}?(?:in|after|for)?\s*"
                    r"(\d{1,6})\s*(s|sec|second|m|min|minute|h|hr|hour)s?\b", re.IGNORECASE)


def reply_code(reply: str, code: int = 0) -> int:
    """The reply code: ``code`` if given, else the one the reply text starts with (0: none)."""
    if code:
        return code
    m = _CODE.match(reply)
    return int(m.group(1)) if m else 0


def enhanced_status(reply: str) -> str:
    """The enhanced status code right after the reply code ("4.7.0"), or ""."""
    m = _STATUS.match(reply)
    return m.group(1) if m else ""


def named_pause(reply: str) -> float | None:
    """Seconds the reply asks relay to wait, if it says ("try again in 5 minutes")."""
    m = _NAMED.search(reply)
    if m is None:
        return None
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True, slots=True)
class Throttle:
    """A reply that matched a row: what to pause and for how long."""

    rule: ThrottleReplyConfig
    reply: str
    seconds: float

    @property
    def scope(self) -> str:
        return "mailbox" if self.rule.action == "pause-mailbox" else "upstream"


class ThrottleTable:
    """The rows in matching order (a config's own first); the first match wins."""

    def __init__(self, rows: Sequence[ThrottleReplyConfig]) -> None:
        self.rows = tuple(rows)
        self._text = {r.name: re.compile(r.text, re.IGNORECASE) for r in self.rows if r.text}

    def match(self, reply: str, code: int = 0) -> ThrottleReplyConfig | None:
        """The first row matching this reply, or None (an ordinary reply)."""
        code = reply_code(reply, code)
        if not 400 <= code < 600:
            return None
        status = enhanced_status(reply)
        for row in self.rows:
            if row.codes and code not in row.codes:
                continue
            if row.status and not (status == row.status
                                   or status.startswith(row.status + ".")):
                continue
            pattern = self._text.get(row.name)
            if pattern is not None and not pattern.search(reply):
                continue
            return row
        return None

    def throttle(self, reply: str, code: int = 0, *, repeat: int = 1) -> Throttle | None:
        """The pause for this reply (``repeat``: throttles in a row, 1 for the first)."""
        row = self.match(reply, code)
        if row is None:
            return None
        named = named_pause(reply)
        if named is not None:
            seconds = min(max(named, 1.0), row.max_pause)
        else:
            seconds = min(row.pause * 2.0 ** max(0, min(repeat - 1, 30)), row.max_pause)
        return Throttle(row, reply, seconds)
