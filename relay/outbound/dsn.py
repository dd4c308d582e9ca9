"""RFC 3464 delivery status notifications (bounces) for failed recipients; never bounce a bounce.

A DSN goes to the envelope sender with the null reverse-path and ``dsn_of`` set, and is
queued through ``Spool.store`` like any message. It carries, per failed recipient, the
provider's reply (``Diagnostic-Code: smtp; 550 5.1.1 ...``) and the original message's
headers (``text/rfc822-headers``), never its body. It is built with CRLF line endings
only, yet not vouched for to the spool (``crlf_checked``): it quotes addresses, host
names and replies, and the spool's scan of a message this small costs next to nothing.

No DSN is made for a message with the null sender, one that is itself a DSN
(``dsn_of`` set), one whose top-level Content-Type is a delivery-status report, or an
automatic reply (``Auto-Submitted: auto-replied``, as DSNs and vacation replies carry).
``Auto-Submitted: auto-generated`` mail still gets DSNs: contact-center platforms send
their notifications that way and need to learn about dead addresses.
"""

from __future__ import annotations

import email.utils
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.envelope import Envelope
from relay.spool.records import QueuedMessage

MAX_HEADER_BYTES = 64 * 1024
_ENHANCED = re.compile(r"^\d{3}[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_AUTO_REPLIED = re.compile(rb"(?im)^auto-submitted:[ \t]*auto-replied\b")
_REPORT = re.compile(rb"(?im)^content-type:\s*multipart/report\s*;[^\r\n]*"
                     rb"(?:\r\n[ \t][^\r\n]*)*report-type=\"?delivery-status")


class _Store(Protocol):
    async def store(self, envelope: Envelope, data: bytes) -> str: ...


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the DSN reports on."""

    recipient: str
    reply: str                 # provider reply "550 5.1.1 ..." or a local explanation
    remote_mta: str = ""       # provider host, when a provider answered
    expired: bool = False      # given up after the queue lifetime (reply = last error)

    @property
    def status(self) -> str:
        """RFC 3463 status: from the reply's enhanced code, else a sensible default."""
        m = _ENHANCED.match(self.reply)
        if self.expired:
            return m.group(1) if m and m.group(1).startswith("4") else "4.4.7"
        if m and m.group(1).startswith("5"):
            return m.group(1)
        return "5.0.0"


def _one_line(text: str, limit: int = 900) -> str:
    text = " ".join(text.split())
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in text)
    return text[:limit]


def _addr_type(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def headers_of(data: bytes) -> bytes:
    """The header section of a message (up to the blank line), CRLF-terminated, bounded."""
    end = data.find(b"\r\n\r\n")
    head = data[: end + 2] if end >= 0 else data
    if len(head) > MAX_HEADER_BYTES:
        head = head[:MAX_HEADER_BYTES]
        head = head[: head.rfind(b"\r\n") + 2] if b"\r\n" in head else b""
    if head and not head.endswith(b"\r\n"):
        head += b"\r\n"
    return head


def is_bounce(envelope: Envelope, data: bytes) -> bool:
    """True for messages that must never be bounced (null sender, DSNs)."""
    if not envelope.sender or envelope.dsn_of:
        return True
    head = headers_of(data)
    return _REPORT.search(head) is not None or _AUTO_REPLIED.search(head) is not None


def build_dsn(*, msg: QueuedMessage, failures: Sequence[Failure], data: bytes,
              hostname: str, bounce_from: str, now: float | None = None) -> bytes:
    """The complete RFC 3464 multipart/report message, CRLF line endings."""
    now = time.time() if now is None else now
    env = msg.envelope
    boundary = f"{msg.queue_id}.{secrets.token_hex(8)}/{hostname}"
    date = email.utils.formatdate(now, localtime=False)
    arrival = email.utils.formatdate(env.received_at, localtime=False)
    expired = any(f.expired for f in failures)
    lines = [
        f"From: Mail Delivery System <{bounce_from}>",
        f"To: <{env.sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{msg.queue_id}.{int(now)}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"This is the mail system at host {hostname}.",
        "",
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
        "",
    ]
    if expired:
        lines += ["Delivery was attempted until the message's queue lifetime ran out.", ""]
    for f in failures:
        where = f" (host {f.remote_mta} said)" if f.remote_mta else ""
        lines += [f"<{f.recipient}>{where}: {_one_line(f.reply)}", ""]
    lines += [
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {hostname}",
        f"X-Relay-Queue-ID: {msg.queue_id}",
        f"Arrival-Date: {arrival}",
        "",
    ]
    for f in failures:
        lines += [f"Final-Recipient: {_addr_type(f.recipient)}", "Action: failed",
                  f"Status: {f.status}"]
        if f.remote_mta:
            lines.append(f"Remote-MTA: dns; {f.remote_mta}")
        kind = "smtp" if re.match(r"\d{3}\b", f.reply) else "X-Relay"   # local reasons
        lines += [f"Diagnostic-Code: {kind}; {_one_line(f.reply)}",
                  f"Last-Attempt-Date: {date}", ""]
    head = headers_of(data)
    encoding = "7bit" if head.isascii() else "8bit"
    lines += [
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers",
        f"Content-Transfer-Encoding: {encoding}",
        "",
    ]
    out = ("\r\n".join(lines) + "\r\n").encode("utf-8") + head
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return out


Sign = Callable[[Envelope, bytes], Awaitable[bytes]]   # e.g. Signer.maybe_sign


class Bouncer:
    """Builds DSNs and queues them through the spool (listener-free: ``Spool.store``)."""

    def __init__(self, *, spool: _Store, hostname: str, bounce_from: str = "",
                 sign: Sign | None = None) -> None:
        self._spool = spool
        self.hostname = hostname
        self.bounce_from = bounce_from or f"MAILER-DAEMON@{hostname}"
        # DKIM for DSNs (when the bounce_from domain has a key), so receivers trust them.
        self._sign = sign

    async def bounce(self, msg: QueuedMessage, failures: Sequence[Failure],
                     data: bytes) -> str | None:
        """Queue a DSN for ``failures`` to the message's sender; returns its queue id.

        Returns None (and queues nothing) when the message is itself a bounce.
        """
        if not failures or is_bounce(msg.envelope, data):
            return None
        dsn = build_dsn(msg=msg, failures=failures, data=data, hostname=self.hostname,
                        bounce_from=self.bounce_from)
        env = Envelope(sender="", recipients=(msg.envelope.sender,), received_at=time.time(),
                       listener="bounce", smtputf8=msg.envelope.smtputf8,
                       body_8bitmime=not dsn.isascii(), dsn_of=msg.queue_id, trusted=True)
        if self._sign is not None:
            dsn = await self._sign(env, dsn)
        return await self._spool.store(env, dsn)
