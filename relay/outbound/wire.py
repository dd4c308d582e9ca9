"""The upstream SMTP session's byte pump once it is set up: commands out, replies in order.

aiosmtplib sets a session up (greeting, EHLO, STARTTLS, AUTH); then ``Wire`` takes the
transport over (``asyncio.Transport.set_protocol``) for the session's transactions.
aiosmtplib reads exactly one reply per command written and drops what arrives beyond it,
so it cannot pipeline; ``Wire`` keeps every reply that arrives, in order, which lets the
courier send MAIL, RCPT... and DATA in one write when the provider offers PIPELINING
(RFC 2920): two round trips per message instead of 3 + recipients, and fewer wake-ups.

``ReplyParser`` is the sans-IO half (bytes in, whole replies out, table-tested); ``Wire``
only moves bytes and wakes the one reader waiting for the next reply.
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass

MAX_LINE = 2048                    # RFC 5321 4.5.3.1.5 allows 512; providers say more
MAX_REPLY = 64 * 1024              # a reply with more lines than this is not SMTP
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: code and the whole text as the provider sent it (lines joined)."""

    code: int
    message: str

    @property
    def text(self) -> str:
        """``550 5.1.1 ...`` on one line (a multi-line reply's lines joined by spaces)."""
        return " ".join(printable(f"{self.code} {self.message}").split())

    def __str__(self) -> str:
        return self.text


def printable(text: str) -> str:
    """A provider's words fit for logs, the mail log and the spool: control characters and
    undecodable bytes (surrogate escapes) become "?"."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else " " if c in "\t\r\n" else "?"
                   for c in text)


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload: lines starting with "." get another, CRLF-terminated, then ".CRLF"."""
    payload = b"." + data if data.startswith(b".") else data
    payload = payload.replace(b"\r\n.", b"\r\n..")
    if not payload.endswith(b"\r\n"):
        payload += b"\r\n"
    return payload + b".\r\n"


class WireError(ConnectionError):
    """The provider's bytes are not SMTP replies, or the connection is gone."""


def command_line(*args: bytes) -> bytes:
    """One command line; ValueError if an argument would smuggle a control character."""
    for arg in args:
        if _CONTROL.search(arg):
            raise ValueError("command argument contains a control character")
    return b" ".join(args) + b"\r\n"


class ReplyParser:
    """Whole SMTP replies (RFC 5321 4.2) out of a byte stream, in order."""

    def __init__(self) -> None:
        self._buf = b""
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> list[Reply]:
        """The replies ``data`` completes; WireError when the stream is not SMTP."""
        buf = self._buf + data if self._buf else data
        out: list[Reply] = []
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end + 1]
            start = end + 1
            if len(line) > MAX_LINE:
                raise WireError(f"a reply line of {len(line)} bytes (over {MAX_LINE})")
            code = line[:3]
            sep = line[3:4]
            if not code.isdigit() or sep not in (b" ", b"-", b"\r", b"\n"):
                raise WireError(f"not an SMTP reply line: {line[:60]!r}")
            if self._lines and code != self._lines[0][:3]:
                raise WireError(f"a reply changed its code mid-way: {line[:60]!r}")
            self._lines.append(line)
            self._size += len(line)
            if self._size > MAX_REPLY:
                raise WireError(f"a reply of over {MAX_REPLY} bytes")
            if sep != b"-":
                text = b"\n".join(x[4:].strip(b" \t\r\n") for x in self._lines)
                out.append(Reply(int(code), text.decode("utf-8", "surrogateescape")))
                self._lines, self._size = [], 0
        self._buf = buf[start:]
        if len(self._buf) > MAX_LINE:
            raise WireError(f"a reply line of over {MAX_LINE} bytes")
        return out


class Wire(asyncio.Protocol):
    """Writes commands and hands out the provider's replies one by one, in order."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._parser = ReplyParser()
        self._replies: collections.deque[Reply] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        transport.set_protocol(self)

    @property
    def open(self) -> bool:
        return self._lost is None and not self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.open:
            raise self._gone()
        self._transport.write(data)

    async def reply(self, timeout: float) -> Reply:
        """The next reply; TimeoutError after ``timeout`` s, WireError once the
        connection is lost or the bytes are not SMTP."""
        if not self._replies:
            if self._lost is not None:
                raise self._gone()
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._replies:
                raise self._gone()
        return self._replies.popleft()

    def _gone(self) -> WireError:
        if isinstance(self._lost, WireError):
            return self._lost
        return WireError(f"connection lost: {self._lost or 'closed'}")

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- asyncio.Protocol ----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            self._replies.extend(self._parser.feed(data))
        except WireError as exc:
            self._lost = exc
            self._transport.close()
        self._wake()

    def eof_received(self) -> bool:
        self._lost = self._lost or WireError("the provider closed the connection")
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = self._lost or WireError(f"connection lost: {exc or 'closed'}")
        self._wake()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError("timed out waiting for the provider's reply"))
