"""The seams the app plugs into the SMTP listener: accept, per-message checks, session facts.

``accept(envelope, data) -> queue_id`` stores the message (the app wires it to DKIM
signing and ``Spool.store``); the listener replies ``250 2.0.0 Ok: queued as <id>`` only
after it returns. ``data`` is dot-unstuffed, CRLF-only (bare CR/LF were refused) and
already starts with the listener's own ``Received:`` header.

``Checks`` refuse at MAIL, RCPT or after DATA by raising ``relay.smtp.replies.Refusal``;
``check_message`` may return new bytes (e.g. with ``Received-SPF`` or
``Authentication-Results`` prepended) that are then passed to ``accept``. ``accept`` may
raise ``Refusal`` too, and ``SpoolError`` (disk full → 452 4.3.1, otherwise 451 4.3.0).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.spool.records import Envelope

AcceptFn = Callable[[Envelope, bytes], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What the listener knows about the client when a check runs."""

    listener: str
    client_ip: str
    client_port: int
    helo: str
    tls: bool
    auth_user: str                  # "" when not authenticated
    allowlisted: bool               # client address inside the listener's `allow`
    trusted: bool                   # authenticated or allow-listed


class Checks(Protocol):
    """Per-transaction checks; each refuses by raising ``Refusal``."""

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None: ...

    async def check_recipient(self, session: SessionInfo, sender: str, recipient: str,
                              accepted: Sequence[str]) -> None: ...

    async def check_message(self, session: SessionInfo, envelope: Envelope,
                            data: bytes) -> bytes: ...


class BaseChecks:
    """A ``Checks`` that allows everything: subclass it and override what you check."""

    async def check_sender(self, session: SessionInfo, sender: str,
                           params: Mapping[str, str | None]) -> None:
        return None

    async def check_recipient(self, session: SessionInfo, sender: str, recipient: str,
                              accepted: Sequence[str]) -> None:
        return None

    async def check_message(self, session: SessionInfo, envelope: Envelope,
                            data: bytes) -> bytes:
        return data
