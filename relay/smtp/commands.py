"""SMTP command lines, sans-IO: bytes in, lines out; a line in, a command or a reply out.

``LineBuffer`` holds what a client sent and not yet used: ``next_line(limit)`` returns the
next line without its line ending, ``None`` while it is incomplete, or ``OVERLONG`` for a
line that ran past ``limit`` without one (its bytes are dropped as they come, up to and
including its line ending, so an endless line costs no memory). ``take()`` hands
everything buffered to the DATA reader, ``unread()`` gives back what it read too far.

``parse_line`` turns a line into a ``Command`` or the reply a line that cannot be one
gets, as RFC 5321 and Postfix word them: an empty line or a verb that is not ASCII
``500 Error: bad syntax``; a line longer than its verb allows (512 bytes, MAIL and RCPT
1024 and AUTH 12288 once EHLO announced the extensions that make them longer) ``500
Command line too long``. Arguments are decoded as UTF-8 with surrogate escapes, so the
bytes of a non-UTF-8 address come back unchanged when encoded the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

COMMAND_LIMIT = 512                    # RFC 5321 4.5.3.1.4 (CRLF not counted here)
COMMAND_LIMITS = {"MAIL": 1024, "RCPT": 1024, "AUTH": 12288}    # with ESMTP parameters

BAD_SYNTAX = "500 Error: bad syntax"
TOO_LONG = "500 Command line too long"
SYNTAX_ERRORS = frozenset({BAD_SYNTAX, TOO_LONG})     # junk, for the session's count


class Overlong:
    """A line that did not end within its limit."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OVERLONG"


OVERLONG: Final = Overlong()


@dataclass(frozen=True, slots=True)
class Command:
    verb: str                          # upper case
    arg: str | None                    # stripped; None when there is none


def parse_line(line: bytes, *, extended: bool) -> Command | str:
    """The command on ``line`` (without its line ending), or the reply to it."""
    verb_b, _, arg_b = line.partition(b" ")
    if not line or not verb_b.isascii():
        return BAD_SYNTAX
    verb = verb_b.upper().decode("ascii")
    limit = COMMAND_LIMITS.get(verb, COMMAND_LIMIT) if extended else COMMAND_LIMIT
    if len(line) > limit:
        return TOO_LONG
    arg_b = arg_b.strip()
    return Command(verb, arg_b.decode("utf-8", "surrogateescape") if arg_b else None)


class LineBuffer:
    """Bytes received and not yet used; see the module docstring."""

    __slots__ = ("_buf", "_scanned", "_skipping")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scanned = 0              # bytes known to hold no line ending
        self._skipping = False         # inside an overlong line: drop to its end

    def __len__(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def has_line(self) -> bool:
        """True when a whole line is buffered (the client is pipelining)."""
        return self._buf.find(b"\n", self._scanned) >= 0

    def next_line(self, limit: int) -> bytes | Overlong | None:
        """The next line without CRLF (or LF), OVERLONG, or None until more arrives."""
        buf = self._buf
        end = buf.find(b"\n", self._scanned)
        if end < 0:
            if len(buf) > limit:       # no end in sight: forget it as it comes
                self._skipping = True
                buf.clear()
            self._scanned = len(buf)
            return None
        self._scanned = 0
        if self._skipping or end > limit:   # (as asyncio's StreamReader counts a limit)
            self._skipping = False
            del buf[:end + 1]
            return OVERLONG
        stop = end - 1 if end and buf[end - 1] == 13 else end
        line = bytes(buf[:stop])
        del buf[:end + 1]
        return line

    def take(self) -> bytes:
        """Everything buffered (the DATA reader's next chunk)."""
        data = bytes(self._buf)
        self._buf.clear()
        self._scanned = 0
        return data

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front (bytes the DATA reader got past its end)."""
        self._buf[:0] = data
        self._scanned = 0

    def clear(self) -> None:
        """Forget everything (RFC 3207: nothing sent before TLS counts after it)."""
        self._buf.clear()
        self._scanned = 0
        self._skipping = False
