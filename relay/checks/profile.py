"""Provider profiles: refuse in-session what a provider would never take.

Hard limits (recipients, local part, subject, display name, body and message size,
attachments) raise ``Refusal`` with a reply naming the limit and the profile, during the
SMTP session — never accepted and bounced later. The recipient count and the local-part
length also apply to the addresses written in the header (``To:``/``Cc:``/``Bcc:``, and
``From:`` for the local part): a provider that takes one recipient reads them too. A
profile's rate limits belong to the sending side (``relay.outbound.pacing``): they only
ever delay.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

from relay.config.schema import ProfileConfig
from relay.headers import Field, split
from relay.verdict import Refusal

__all__ = ["Refusal", "check_message", "check_message_async", "check_recipient",
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
    need_head = (profile.max_subject_chars, profile.max_display_name, profile.max_recipients,
                 profile.max_local_part) != (None, None, None, None)
    if not need_head and profile.allow_attachments:
        return
    all_fields = split(head)[0]
    fields = {f.name.lower(): f.raw for f in reversed(all_fields)}   # first of each
    _header_addresses(profile, all_fields)
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


_RCPT_FIELDS = (b"to", b"cc", b"bcc")


def _header_addresses(profile: ProfileConfig, fields: list[Field]) -> None:
    """One-recipient and local-part limits, applied to the addresses of the header too."""
    if profile.max_recipients is None and profile.max_local_part is None:
        return
    found: dict[bytes, list[str]] = {}
    for f in fields:
        key = f.name.lower()
        if key in (*_RCPT_FIELDS, b"from"):
            values = [decoded_header(_value(f.raw))]
            found.setdefault(key, []).extend(a for _n, a in getaddresses(values) if a)
    name = profile.name
    rcpts = [a for k in _RCPT_FIELDS for a in found.get(k, ())]
    if profile.max_recipients is not None and len(rcpts) > profile.max_recipients:
        n = profile.max_recipients
        raise Refusal(550, "5.5.3", f"To:, Cc: and Bcc: name {len(rcpts)} addresses; {name} "
                      f"allows {n} recipient{'s' if n != 1 else ''} per message",
                      reason="profile")
    limit = profile.max_local_part
    if limit is None:
        return
    for key, code in ((b"from", "5.1.7"), (b"to", "5.1.3"), (b"cc", "5.1.3"),
                      (b"bcc", "5.1.3")):
        for addr in found.get(key, ()):
            local = _local_part(addr)
            if len(local) > limit:
                raise Refusal(550, code, f"{key.decode().title()}: address local part is "
                              f"{len(local)} characters; {name} allows {limit}",
                              reason="profile")


def _value(raw_field: bytes) -> str:
    """A raw field's value as text (8-bit headers are UTF-8, RFC 6532), leading blank off."""
    return raw_field.split(b":", 1)[1].decode("utf-8", "replace").lstrip(" \t")


async def check_message_async(profile: ProfileConfig, data: bytes) -> None:
    await asyncio.to_thread(check_message, profile, data)
