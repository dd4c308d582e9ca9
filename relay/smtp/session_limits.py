"""What one SMTP session may cost: junk commands, other protocols, the DATA deadline (sans-IO).

- Junk: NOOP, RSET, VRFY, EXPN, HELP, unknown verbs and lines that do not parse. A
  session may send ``max_junk_commands`` of them (the count starts again after each
  accepted message, as Postfix's junk limit does); the next one gets ``421 4.7.0`` and
  the session is closed. Junk never extends the command deadline.
- Other protocols: a command line that starts with anything but a letter (a TLS
  ClientHello on a plaintext port, binary), or an HTTP request line (``GET / HTTP/1.1``,
  ``CONNECT host:443 HTTP/1.1``), ends the session at once with ``221 2.7.0``, as
  Postfix's ``smtpd_forbidden_commands`` does: nothing is answered line by line.
- The DATA deadline: the whole message must arrive within ``data_deadline`` plus one
  second per ``min_data_rate`` bytes received (Postfix's ``smtpd_min_data_rate``), so a
  client trickling a byte every few seconds cannot hold a session, while a big message
  on a slow link still gets in. ``data_timeout`` stays the limit between two reads.
"""

from __future__ import annotations

import re

JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "EXPN", "HELP"})
HTTP_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "CONNECT",
                          "PATCH", "TRACE", "PRI"})
_HTTP_VERSION = re.compile(r"\sHTTP/\d(?:\.\d)?$")
_LETTERS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def other_protocol(first: bytes) -> str | None:
    """What the first bytes of a command line say the client speaks, when not SMTP."""
    b = first[0]
    if b in _LETTERS or b in b"\r\n":
        return None                      # a verb, or an empty line (an ordinary error)
    if b == 0x16 or b == 0x80:
        return "TLS"                     # a TLS handshake record (or an SSLv2 hello)
    return "binary"


def http_request(verb: str, arg: str | None) -> bool:
    """True for an HTTP request line (``GET /path HTTP/1.1``, or any verb with a version)."""
    if verb in HTTP_METHODS:
        return True
    return arg is not None and bool(_HTTP_VERSION.search(arg))


class JunkCounter:
    """Junk commands of one session, against its listener's limit."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0

    def add(self) -> bool:
        """Count one; True when this one is over the limit (close the session)."""
        self.count += 1
        return self.count > self.limit

    def message_accepted(self) -> None:
        self.count = 0


class DataDeadline:
    """When a DATA that started at ``start`` must have ended, given what has arrived."""

    __slots__ = ("base", "min_rate", "start")

    def __init__(self, start: float, *, base: float, min_rate: int) -> None:
        self.start = start
        self.base = base
        self.min_rate = min_rate

    def at(self, received: int) -> float:
        extra = received / self.min_rate if self.min_rate else 0.0
        return self.start + self.base + extra
