"""SMTP smuggling over a real socket: every variant refused, nothing accepted, session goes on."""

from __future__ import annotations

import ipaddress

import pytest

from tests.smtp.conftest import RawClient, StartRelay, run

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)
SMUGGLED = (b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n"
            b"From: ceo@example.com\r\nSubject: smuggled\r\n\r\npay now\r\n")
REFUSED = ("550 5.5.2 Error: bare <CR> or <LF> in message data; "
           "lines must end with <CR><LF>")


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"])
async def test_fake_end_of_data_never_ends_the_message(start_relay: StartRelay,
                                                        fake_end: bytes) -> None:
    relay = await start_relay(allow=ALLOW)

    def go() -> list[str]:
        c = RawClient(relay.port)
        out = [c.reply(), c.cmd("EHLO client.test"), c.cmd("MAIL FROM:<a@example.com>"),
               c.cmd("RCPT TO:<b@example.net>"), c.cmd("DATA")]
        c.send(b"Subject: one\r\n\r\nfirst" + fake_end + SMUGGLED + b"\r\n.\r\n")
        out.append(c.reply())
        # the session goes on, in a sane state: a clean message is accepted
        out += [c.cmd("MAIL FROM:<a@example.com>"), c.cmd("RCPT TO:<b@example.net>"),
                c.cmd("DATA"), c.cmd("Subject: clean\r\n\r\nok\r\n."), c.cmd("QUIT")]
        c.close()
        return out

    out = await run(go)
    assert out[5] == REFUSED, out
    assert out[6:10] == ["250 2.1.0 Ok", "250 2.1.5 Ok",
                         "354 End data with <CR><LF>.<CR><LF>",
                         "250 2.0.0 Ok: queued as TESTQ0001"], out
    assert len(relay.recorder.messages) == 1
    assert b"smuggled" not in relay.recorder.messages[0][1]
    assert relay.refused("smuggling") == 1
    assert any("rejected" in r and "reason=smuggling" in r for r in relay.maillog_records)


@pytest.mark.parametrize("header", [b"Subject: hi\rBcc: x@evil.example\r\n",
                                    b"Subject: hi\nBcc: x@evil.example\r\n"])
async def test_bare_line_ending_inside_a_header(start_relay: StartRelay, header: bytes) -> None:
    relay = await start_relay(allow=ALLOW)

    def go() -> str:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(header + b"\r\nbody\r\n.\r\n")
        reply = c.reply()
        assert c.cmd("NOOP") == "250 2.0.0 OK"
        c.close()
        return reply

    assert await run(go) == REFUSED
    assert relay.recorder.messages == []


async def test_pipelined_transactions_and_dot_unstuffing(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)

    def go() -> list[str]:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        # two whole transactions in one write, as a PIPELINING client may send them
        c.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
               b"..leading\r\n.\r\n"
               b"MAIL FROM:<>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
               b".\r\nNOOP\r\n")
        out = [c.reply() for _ in range(9)]
        c.close()
        return out

    out = await run(go)
    assert out == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                   "250 2.0.0 Ok: queued as TESTQ0001",
                   "250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>",
                   "250 2.0.0 Ok: queued as TESTQ0002", "250 2.0.0 OK"]
    first, second = relay.recorder.messages
    assert first[1].endswith(b"\r\n.leading\r\n")
    assert second[0].sender == "" and second[0].recipients == ("c@example.net",)
    assert second[1].startswith(b"Received: ") and second[1].count(b"\r\n") == 3  # empty body


async def test_large_message_and_size_limits(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW, max_message_size=200_000)
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 150     # ~150 KB

    def go() -> list[str]:
        c = RawClient(relay.port)
        c.reply()
        ehlo = c.cmd("EHLO x")
        out = [ehlo.splitlines()[2]]
        out.append(c.cmd("MAIL FROM:<a@example.com> SIZE=200001"))
        out.append(c.cmd("MAIL FROM:<a@example.com> SIZE=150000"))
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(body + b".\r\n")
        out.append(c.reply())
        # the same again, too big for the limit: swallowed to the end, then 552
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(body + body + b".\r\n")
        out.append(c.reply())
        out.append(c.cmd("RSET"))
        c.close()
        return out

    out = await run(go)
    too_big = ("552 5.3.4 Message size exceeds fixed maximum message size: listener platform "
               "allows 200,000 bytes")
    assert out == ["250-SIZE 200000", too_big,
                   "250 2.1.0 Ok", "250 2.0.0 Ok: queued as TESTQ0001", too_big,
                   "250 2.0.0 OK"]
    assert relay.recorder.messages[0][1].endswith(body)
    assert relay.refused("too_big") == 2


async def test_pipelined_replies_leave_in_one_write(start_relay: StartRelay) -> None:
    relay = await start_relay(allow=ALLOW)
    c = await run(RawClient, relay.port)
    await run(c.reply)
    assert (await run(c.cmd, "EHLO x")).splitlines()[1] == "250-PIPELINING"
    [session] = relay.listener._sessions
    writes: list[bytes] = []
    transport = session.transport
    assert transport is not None
    write = transport.write

    def spy(data: bytes) -> None:
        writes.append(data)
        write(data)

    transport.write = spy  # type: ignore[method-assign]

    def go() -> list[str]:
        c.send(b"RSET\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\n"
               b"RCPT TO:<b%c@example.net>\r\nDATA\r\n")
        out = [c.reply() for _ in range(5)]
        out.append(c.cmd("Subject: p\r\n\r\nx\r\n."))
        out.append(c.cmd("MAIL FROM:<a@example.com>"))      # alone: answered at once
        c.close()
        return out

    out = await run(go)
    assert out[:5] == ["250 2.0.0 OK", "250 2.1.0 Ok", "250 2.1.5 Ok", out[3],
                       "354 End data with <CR><LF>.<CR><LF>"]
    assert out[3].startswith("553 5.1.3 ")
    assert out[5] == "250 2.0.0 Ok: queued as TESTQ0001" and out[6] == "250 2.1.0 Ok"
    assert writes[0].count(b"\r\n") == 5, writes        # five replies, one write
    assert len(writes) == 3
