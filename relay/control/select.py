"""Which queued messages a queue command acts on: ids, --all, and filters (sans-IO).

Filters narrow any selection and combine with AND: ``sender`` and ``recipient`` take an
address (``agent@example.com``), a domain (``@example.com``), a shell-style pattern
(``*@example.*``) or ``<>`` (the null sender of bounces), case-insensitively; a
recipient matches when any recipient still waiting for delivery does. ``upstream`` is the
upstream of the message's last delivery attempt, ``state`` one of active, deferred, held,
and ``older_than`` a number of seconds since the message arrived.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from relay.errors import ControlError

STATES = ("active", "deferred", "held")


@dataclass(frozen=True, slots=True)
class Selection:
    ids: tuple[str, ...] = ()
    every: bool = False
    sender: str | None = None
    recipient: str | None = None
    upstream: str | None = None
    state: str | None = None
    older_than: float | None = None

    @property
    def filtered(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self)
                   if f.name not in ("ids", "every"))

    @property
    def empty(self) -> bool:
        """Names nothing at all (no id, not --all, no filter)."""
        return not self.ids and not self.every and not self.filtered

    def to_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ids": list(self.ids)} if self.ids else {}
        if self.every:
            out["all"] = True
        out.update({f.name: getattr(self, f.name) for f in fields(self)
                    if f.name not in ("ids", "every") and getattr(self, f.name) is not None})
        return out

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Selection:
        """From a control request's args; ControlError(bad_request) on a malformed one."""
        ids = args.get("ids", [])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ControlError("ids must be a list of queue ids", code="bad_request")
        state = args.get("state")
        if state is not None and state not in STATES:
            raise ControlError(f"unknown state {state!r}", code="bad_request",
                               hint=f"states are {', '.join(STATES)}")
        older = args.get("older_than")
        if older is not None and (isinstance(older, bool) or
                                  not isinstance(older, int | float) or older < 0):
            raise ControlError("older_than must be a number of seconds", code="bad_request")
        texts = {k: args.get(k) for k in ("sender", "recipient", "upstream")}
        for key, value in texts.items():
            if value is not None and not isinstance(value, str):
                raise ControlError(f"{key} must be a string", code="bad_request")
        return cls(ids=tuple(i.strip().upper() for i in ids), every=bool(args.get("all")),
                   state=state, older_than=None if older is None else float(older), **texts)


def address_matches(pattern: str, address: str) -> bool:
    """An address, ``@domain``, a shell pattern or ``<>`` (the null sender)."""
    p, a = pattern.strip().lower(), address.strip().lower()
    if p == "<>":
        return a == ""
    if p.startswith("@"):
        return a.endswith(p)
    if any(c in p for c in "*?["):
        return fnmatch.fnmatchcase(a, p)
    return a == p


def matches(entry: Mapping[str, Any], sel: Selection) -> bool:
    """Does one queue entry (``QueueManager._entry``) fall in the selection?"""
    if sel.ids and entry["id"] not in sel.ids:
        return False
    if sel.sender is not None and not address_matches(sel.sender, entry["sender"]):
        return False
    if sel.recipient is not None and not any(
            address_matches(sel.recipient, r["address"]) for r in entry["recipients"]
            if r["status"] == "pending"):
        return False
    if sel.upstream is not None and entry["upstream"] != sel.upstream:
        return False
    if sel.state is not None and entry["state"] != sel.state:
        return False
    return sel.older_than is None or entry["age"] > sel.older_than


def select(entries: Iterable[Mapping[str, Any]], sel: Selection) -> list[Mapping[str, Any]]:
    return [e for e in entries if matches(e, sel)]
