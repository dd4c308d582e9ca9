"""Spool records: the envelope of a queued message and its per-recipient delivery state."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class RcptStatus(enum.StrEnum):
    PENDING = "pending"      # not yet delivered; retry when due
    DELIVERED = "delivered"  # 2xx from the upstream
    BOUNCED = "bounced"      # permanent failure (or lifetime exceeded); a DSN was queued


@dataclass(slots=True)
class Recipient:
    address: str
    status: RcptStatus = RcptStatus.PENDING
    last_reply: str = ""        # upstream reply text (or local error) of the last attempt
    attempts: int = 0


@dataclass(frozen=True, slots=True)
class Envelope:
    """What the listener knew when it accepted the message. Immutable once spooled."""

    sender: str                      # "" for the null reverse-path (bounces)
    recipients: tuple[str, ...]
    received_at: float               # unix time of the 250
    client_ip: str = ""
    client_helo: str = ""
    listener: str = ""
    auth_user: str = ""              # authenticated user on the listener, "" if none
    smtputf8: bool = False
    body_8bitmime: bool = False
    dsn_of: str = ""                 # queue id of the message this DSN reports on, if a DSN
    trusted: bool = False            # authenticated or allow-listed: may be DKIM-signed


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


@dataclass(slots=True)
class QueuedMessage:
    """A message in the spool: identity, envelope, state, size; the bytes live on disk."""

    queue_id: str
    envelope: Envelope
    state: QueueState
    size: int
    extra: dict[str, str] = field(default_factory=dict)
