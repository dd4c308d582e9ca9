"""Spool records: a queued message and its per-recipient delivery state (the envelope is a leaf)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from relay.envelope import Envelope
from relay.pickling import pickled_by_fields


class RcptStatus(enum.StrEnum):
    PENDING = "pending"      # not yet delivered; retry when due
    DELIVERED = "delivered"  # 2xx from the upstream
    BOUNCED = "bounced"      # permanent failure (or lifetime exceeded); a DSN was queued


@pickled_by_fields
@dataclass(slots=True)
class Recipient:
    address: str
    status: RcptStatus = RcptStatus.PENDING
    last_reply: str = ""        # upstream reply text (or local error) of the last attempt
    attempts: int = 0


@pickled_by_fields
@dataclass(slots=True)
class QueueState:
    """The mutable delivery state of one queued message (rewritten atomically per attempt)."""

    recipients: list[Recipient]
    attempts: int = 0
    next_attempt: float = 0.0        # unix time; 0 = due now
    held: bool = False
    last_attempt: float = 0.0
    upstream: str = ""               # upstream used for the last attempt
    last_error: str = ""


@pickled_by_fields
@dataclass(slots=True)
class QueuedMessage:
    """A message in the spool: identity, envelope, state, size; the bytes live on disk."""

    queue_id: str
    envelope: Envelope
    state: QueueState
    size: int
    extra: dict[str, str] = field(default_factory=dict)
