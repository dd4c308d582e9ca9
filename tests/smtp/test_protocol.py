"""relay's own SMTP connection (relay.smtp.protocol) over a real socket: what a client that
pipelines, half-closes or sends endless lines meets."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from tests.smtp.conftest import RawClient, StartRelay, run

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)
MESSAGE = (b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
           b"Subject: last words\r\n\r\nbye\r\n.\r\nQUIT\r\n")


async def test_a_client_that_shuts_its_side_still_gets_every_reply(
        start_relay: StartRelay) -> None:
    """A message pipelined whole, then shutdown(SHUT_WR): it is stored and answered."""
    relay = await start_relay(allow=ALLOW)

    def go() -> list[str]:
        c = RawClient(relay.port)
        out = [c.reply(), c.cmd("EHLO client.test")]
        c.send(MESSAGE)
        c.sock.shutdown(socket.SHUT_WR)
        out += [c.reply() for _ in range(5)]
        out.append(str(c.closed()))
        c.close()
        return out

    out = await run(go)
    assert out[2:] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                       "250 2.0.0 Ok: queued as TESTQ0001", "221 2.0.0 Bye", "True"], out
    assert len(relay.recorder.messages) == 1


async def test_an_endless_command_line_is_refused_and_the_session_goes_on(
        start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)

    def go() -> list[str]:
        c = RawClient(relay.port)
        out = [c.reply()]
        for _ in range(64):                    # 4 MB without a line ending
            c.send(b"x" * 65536)
        c.send(b"\r\nNOOP\r\n")
        out += [c.reply(), c.reply(), c.cmd("QUIT")]
        c.close()
        return out

    out = await run(go)
    assert out[1:] == ["500 5.5.2 Command line too long", "250 2.0.0 OK", "221 2.0.0 Bye"]


async def test_a_client_that_reads_no_replies_does_not_grow_relay(
        start_relay: StartRelay) -> None:
    """Thousands of pipelined NOOPs from a client that never reads: relay stops reading
    while its replies wait (the junk limit would close a real session sooner; the limit
    here is lifted to see the back-pressure)."""
    relay = await start_relay(allow=ALLOW, max_junk_commands=1_000_000)

    def go() -> int:
        c = RawClient(relay.port, timeout=2.0)
        c.reply()
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sent = 0
        try:
            for _ in range(2000):              # 2000 x 64 KB of NOOPs at most
                c.sock.send(b"NOOP\r\n" * 10922)
                sent += 1
        except (TimeoutError, BlockingIOError):
            pass
        c.close()
        return sent

    sent = await run(go)
    assert sent < 2000, "relay kept reading while its replies piled up"


@pytest.mark.parametrize("tls", ["starttls", "none"])
async def test_the_commands_every_session_has(start_relay: StartRelay, tls: str) -> None:
    relay = await start_relay(allow=ALLOW, tls=tls)

    def go() -> list[str]:
        c = RawClient(relay.port)
        c.reply()
        out = [c.cmd(line) for line in ("EHLO x", "NOOP", "VRFY", "VRFY someone", "EXPN list",
                                        "HELP", "RSET now", "RSET", "QUIT now", "QUIT")]
        c.close()
        return out

    out = await run(go)
    assert out[1:] == [
        "250 2.0.0 OK", "501 5.5.4 Syntax: VRFY <address>",
        "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery",
        "502 5.5.1 EXPN not implemented",
        "250 2.0.0 Supported commands: AUTH DATA EHLO EXPN HELO HELP MAIL NOOP QUIT RCPT "
        + ("RSET STARTTLS VRFY" if tls == "starttls" else "RSET VRFY"),
        "501 5.5.4 Syntax: RSET", "250 2.0.0 OK", "501 5.5.4 Syntax: QUIT", "221 2.0.0 Bye"]
