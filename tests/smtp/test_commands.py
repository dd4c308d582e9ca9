"""The sans-IO command line reader and parser (relay.smtp.commands), table-tested."""

from __future__ import annotations

import pytest

from relay.smtp.commands import (
    BAD_SYNTAX,
    OVERLONG,
    TOO_LONG,
    Command,
    LineBuffer,
    Overlong,
    parse_line,
)

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("line", "extended", "expected"), [
    (b"EHLO client.example", False, Command("EHLO", "client.example")),
    (b"ehlo client.example", False, Command("EHLO", "client.example")),
    (b"QUIT", False, Command("QUIT", None)),
    (b"QUIT ", False, Command("QUIT", None)),
    (b"MAIL FROM:<a@b.c>  SIZE=10 ", True, Command("MAIL", "FROM:<a@b.c>  SIZE=10")),
    (b"RCPT TO:<j\xc3\xb6rg@example.com>", True, Command("RCPT", "TO:<jörg@example.com>")),
    (b"RCPT TO:<\xff@example.com>", True, Command("RCPT", "TO:<\udcff@example.com>")),
    (b"", False, BAD_SYNTAX),
    (b"\xe4HLO x", False, BAD_SYNTAX),
    (b"NOOP " + b"x" * 507, False, Command("NOOP", "x" * 507)),          # 512: the limit
    (b"NOOP " + b"x" * 508, False, TOO_LONG),
    (b"MAIL FROM:<a@b> " + b"x" * 900, True, Command("MAIL", "FROM:<a@b> " + "x" * 900)),
    (b"MAIL FROM:<a@b> " + b"x" * 900, False, TOO_LONG),                   # HELO: no ESMTP
    (b"RCPT TO:<a@b> " + b"x" * 1011, True, TOO_LONG),                     # 1025 bytes
    (b"AUTH PLAIN " + b"A" * 12000, True, Command("AUTH", "PLAIN " + "A" * 12000)),
    (b"AUTH PLAIN " + b"A" * 12280, True, TOO_LONG),
])
def test_parse_line(line: bytes, extended: bool, expected: Command | str) -> None:
    assert parse_line(line, extended=extended) == expected


def lines(buf: LineBuffer, limit: int = 16) -> list[bytes | Overlong]:
    out: list[bytes | Overlong] = []
    while (line := buf.next_line(limit)) is not None:
        out.append(line)
    return out


@pytest.mark.parametrize(("chunks", "expected", "left"), [
    ([b"EHLO x\r\n"], [b"EHLO x"], b""),
    ([b"EH", b"LO", b" x\r", b"\n"], [b"EHLO x"], b""),
    ([b"A\r\nB\nC\r\nD"], [b"A", b"B", b"C"], b"D"),                    # a lone LF ends one
    ([b"\r\n"], [b""], b""),
    ([b"x" * 15 + b"\r\n"], [b"x" * 15], b""),     # the LF at the limit (StreamReader's rule)
    ([b"x" * 16 + b"\r\n"], [OVERLONG], b""),
    ([b"x" * 16 + b"\n"], [b"x" * 16], b""),
    ([b"x" * 17 + b"\nNOOP\r\n"], [OVERLONG, b"NOOP"], b""),
    ([b"x" * 10, b"x" * 10, b"x" * 10, b"\r\nNOOP\r\n"], [OVERLONG, b"NOOP"], b""),
    ([b"x" * 40, b"y" * 40, b"zz\r\nQUIT\r\n"], [OVERLONG, b"QUIT"], b""),
])
def test_line_buffer(chunks: list[bytes], expected: list[bytes | Overlong], left: bytes) -> None:
    buf = LineBuffer()
    got: list[bytes | Overlong] = []
    for chunk in chunks:
        buf.feed(chunk)
        got += lines(buf)
    assert got == expected
    assert buf.take() == left


def test_an_endless_line_is_not_kept() -> None:
    buf = LineBuffer()
    for _ in range(100):
        buf.feed(b"x" * 1000)
        assert buf.next_line(100) is None
        assert len(buf) == 0
    buf.feed(b"\r\nRSET\r\n")
    assert lines(buf, 100) == [OVERLONG, b"RSET"]


def test_has_line_take_unread_and_clear() -> None:
    buf = LineBuffer()
    buf.feed(b"MAIL FROM:<a@b>")
    assert not buf.has_line() and buf.next_line(512) is None
    buf.feed(b"\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert buf.has_line()
    assert buf.next_line(512) == b"MAIL FROM:<a@b>"
    assert buf.take() == b"RCPT TO:<c@d>\r\nDATA\r\n"
    assert not buf.has_line() and len(buf) == 0
    buf.feed(b"tail\r\n")
    buf.unread(b"QUIT\r\n")
    assert lines(buf, 512) == [b"QUIT", b"tail"]
    buf.feed(b"x" * 600)
    assert buf.next_line(512) is None                      # skipping the long line
    buf.clear()
    buf.feed(b"EHLO y\r\n")
    assert lines(buf, 512) == [b"EHLO y"]                  # clear ends the skipping too
