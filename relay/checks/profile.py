"""Provider profiles: refuse in-session what a provider would never take; pace the rest.

Hard limits (recipients, local part, subject, display name, body and message size,
attachments) raise ``Refusal`` with a reply naming the limit and the profile, during the
SMTP session — never accepted and bounced later. Rate limits (messages per minute, bytes
per 5 minutes, recipients per day, per mailbox) only ever delay: ``RateLimiter.acquire``
waits, it never refuses.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

from relay.config.schema import ProfileConfig
from relay.headers import split
from relay.verdict import Refusal

__all__ = ["RateLimiter", "Refusal", "check_message", "check_message_async", "check_recipient",
           "check_sender", "decoded_header"]


def _fmt_bytes(n: int) -> str:
    for unit, size in (("MB", 1024 * 1024), ("KB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def _local_part(address: str) -> str:
    return address.rsplit("@", 1)[0] if "@" in address else address


def check_sender(profile: ProfileConfig, sender: str) -> None:
    """At MAIL FROM: the sender's local part."""
    limit = profile.max_local_part
    local = _local_part(sender)
    if limit is not None and len(local) > limit:
        raise Refusal(553, "5.1.7", f"Sender local part is {len(local)} characters; "
                      f"{profile.name} allows {limit}", reason="profile")


def check_recipient(profile: ProfileConfig, recipient: str, *, accepted: int) -> None:
    """At RCPT TO, with ``accepted`` recipients already taken in this transaction.

    Too many recipients is a 452 (RFC 5321 4.5.3.1.10): the client sends the rest in
    another transaction, which is exactly what a one-recipient provider needs.
    """
    if profile.max_recipients is not None and accepted >= profile.max_recipients:
        n = profile.max_recipients
        raise Refusal(452, "4.5.3", f"Too many recipients; {profile.name} allows {n} per "
                      "message, send the others in another transaction", reason="profile")
    limit = profile.max_local_part
    local = _local_part(recipient)
    if limit is not None and len(local) > limit:
        raise Refusal(553, "5.1.3", f"Recipient local part is {len(local)} characters; "
                      f"{profile.name} allows {limit}", reason="profile")


def decoded_header(value: str) -> str:
    """A header value unfolded and with RFC 2047 encoded words decoded."""
    unfolded = "".join(value.replace("\r\n", "\n").split("\n")).rstrip(" \t")
    try:
        return str(make_header(decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError):
        return unfolded


def _header_block(data: bytes) -> tuple[bytes, int]:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i + len(sep) // 2], i + len(sep)
    return data, len(data)


def _has_attachment(msg: Message) -> str | None:
    for part in msg.walk():
        if part.is_multipart():
            continue
        filename = part.get_filename()
        if part.get_content_disposition() == "attachment" or filename:
            return filename or part.get_content_type()
    return None


def check_message(profile: ProfileConfig, data: bytes) -> None:
    """After DATA: size, subject, display name, attachments. Parses MIME: use a thread."""
    name = profile.name
    if profile.max_message_bytes is not None and len(data) > profile.max_message_bytes:
        raise Refusal(552, "5.3.4", f"Message is {len(data)} bytes; {name} allows "
                      f"{_fmt_bytes(profile.max_message_bytes)}", reason="profile")
    head, body_at = _header_block(data)
    body = len(data) - body_at
    if profile.max_body_bytes is not None and body > profile.max_body_bytes:
        raise Refusal(552, "5.3.4", f"Body is {body} bytes; {name} allows "
                      f"{_fmt_bytes(profile.max_body_bytes)}", reason="profile")
    need_head = profile.max_subject_chars is not None or profile.max_display_name is not None
    if not need_head and profile.allow_attachments:
        return
    fields = {f.name.lower(): f.raw for f in reversed(split(head)[0])}   # first of each
    if profile.max_subject_chars is not None and b"subject" in fields:
        subject = decoded_header(_value(fields[b"subject"]))
        if len(subject) > profile.max_subject_chars:
            raise Refusal(552, "5.3.4", f"Subject is {len(subject)} characters; {name} "
                          f"allows {profile.max_subject_chars}", reason="profile")
    if profile.max_display_name is not None and b"from" in fields:
        for display, _addr in getaddresses([decoded_header(_value(fields[b"from"]))]):
            if len(display) > profile.max_display_name:
                raise Refusal(552, "5.3.4", f"From display name is {len(display)} characters;"
                              f" {name} allows {profile.max_display_name}", reason="profile")
    if not profile.allow_attachments:
        found = _has_attachment(email.message_from_bytes(data, policy=email.policy.compat32))
        if found is not None:
            raise Refusal(554, "5.6.1", f"Attachments are not allowed by {name} "
                          f"(found {found[:60]})", reason="profile")


def _value(raw_field: bytes) -> str:
    """A raw field's value as text (8-bit headers are UTF-8, RFC 6532), leading blank off."""
    return raw_field.split(b":", 1)[1].decode("utf-8", "replace").lstrip(" \t")


async def check_message_async(profile: ProfileConfig, data: bytes) -> None:
    await asyncio.to_thread(check_message, profile, data)


# --- pacing -------------------------------------------------------------------------

@dataclass(slots=True)
class _Sent:
    at: float
    size: int
    recipients: int


class _Mailbox:
    __slots__ = ("lock", "log")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()          # FIFO: first come, first sent
        self.log: deque[_Sent] = deque()


class RateLimiter:
    """Per-mailbox sliding windows for a profile's rate limits; ``acquire`` only waits."""

    WINDOWS = (("messages_per_minute", 60.0), ("bytes_per_5min", 300.0),
               ("recipients_per_day", 86400.0))

    def __init__(self, profile: ProfileConfig, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.profile = profile
        self._clock = clock
        self._sleep = sleep
        self._boxes: dict[str, _Mailbox] = {}
        self._horizon = max((w for attr, w in self.WINDOWS
                             if getattr(profile, attr) is not None), default=0.0)

    def delay(self, key: str, *, recipients: int = 1, size: int = 0) -> float:
        """Seconds until a message of this size and recipient count may go (0 = now)."""
        box = self._boxes.get(key)
        if box is None:
            return 0.0
        now = self._clock()
        self._prune(box, now)
        wait = 0.0
        p = self.profile
        for limit, window, need, amount in (
                (p.messages_per_minute, 60.0, 1, lambda s: 1),
                (p.bytes_per_5min, 300.0, size, lambda s: s.size),
                (p.recipients_per_day, 86400.0, recipients, lambda s: s.recipients)):
            if limit is None:
                continue
            inside = [s for s in box.log if s.at > now - window]
            used = sum(amount(s) for s in inside)
            # free the oldest entries until this one fits; one bigger than the whole
            # window goes once the window is empty (delay, never refuse)
            for s in inside:
                if used + need <= limit or used == 0:
                    break
                used -= amount(s)
                wait = max(wait, s.at + window - now)
        return wait

    async def acquire(self, key: str, *, recipients: int = 1, size: int = 0) -> float:
        """Wait until sending fits every window, record it, return the seconds waited."""
        if self._horizon == 0.0:
            return 0.0
        box = self._boxes.setdefault(key, _Mailbox())
        start = self._clock()
        async with box.lock:
            while (wait := self.delay(key, recipients=recipients, size=size)) > 0:
                await self._sleep(wait)
            box.log.append(_Sent(self._clock(), size, recipients))
        return self._clock() - start

    def _prune(self, box: _Mailbox, now: float) -> None:
        while box.log and box.log[0].at <= now - self._horizon:
            box.log.popleft()

    def forget_idle(self) -> None:
        """Drop mailboxes with nothing inside any window (bounded memory)."""
        now = self._clock()
        for key, box in list(self._boxes.items()):
            self._prune(box, now)
            if not box.log and not box.lock.locked():
                del self._boxes[key]
