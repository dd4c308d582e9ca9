"""Verdicts: ``Refusal`` (what a check decides) and the seams checks plug into (a leaf).

Checks judge; the listener turns a verdict into a reply. ``Refusal`` carries a full SMTP
reply with its RFC 3463 enhanced code and a bounded ``reason`` (the label counted in
``relay_messages_refused{reason=...}``)::

    raise Refusal(550, "5.7.23", "SPF validation failed", reason="spf")
    raise Refusal(552, "5.3.4", "Subject is 512 characters; genesys-agentless allows 400",
                  reason="profile")

``accept(envelope, data) -> queue_id`` stores the message (the app wires it to DKIM
signing and ``Spool.store``); the listener replies ``250 2.0.0 Ok: queued as <id>`` only
after it returns. ``data`` is dot-unstuffed, CRLF-only (bare CR/LF were refused) and
already starts with the listener's own ``Received:`` header.

``Checks`` refuse at MAIL, RCPT or after DATA by raising ``Refusal``; ``size_limit``
may name a limit stricter than the listener's own (a provider profile's), which the
listener then advertises in EHLO ``SIZE``, enforces and names in its ``552`` reply;
``check_message`` may return new bytes (e.g. with ``Received-SPF`` or
``Authentication-Results`` prepended) that are then passed to ``accept``. ``accept`` may
raise ``Refusal`` too, and ``SpoolError`` (disk full → 452 4.3.1, otherwise 451 4.3.0).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.envelope import Envelope

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


class Refusal(Exception):
    """Refuse the current command or message with this SMTP reply (nothing is queued)."""

    def __init__(self, code: int, enhanced: str, text: str, *, reason: str = "policy") -> None:
        if not 400 <= code <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx code, not {code}")
        if not _ENHANCED.match(enhanced) or enhanced[0] != str(code)[0]:
            raise ValueError(f"enhanced code {enhanced!r} does not match reply code {code}")
        if "\r" in text or "\n" in text:
            raise ValueError("reply text must be one line")
        super().__init__(f"{code} {enhanced} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.reason = reason

    @classmethod
    def from_reply(cls, reply: str, reason: str) -> Refusal:
        """``Refusal.from_reply("550 5.7.1 Relaying denied", "relay_denied")``."""
        code, enhanced, text = reply.split(" ", 2)
        return cls(int(code), enhanced, text, reason=reason)

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500


AcceptFn = Callable[[Envelope, bytes], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class SizeLimit:
    """A message size limit and who sets it, for the reply (``profile exchange-online``)."""

    size: int
    by: str


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

    def size_limit(self) -> SizeLimit | None: ...


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

    def size_limit(self) -> SizeLimit | None:
        return None
