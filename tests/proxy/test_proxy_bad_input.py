"""Input through a running proxy: every login form works; bad input gets the protocol's own
answer and nothing reaches the provider; limits and timeouts."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time

import pytest

from relay.config.schema import Secret
from tests.peers.dovecot import Dovecot
from tests.proxy.conftest import run_proxy, until


class Client:
    """A raw line client for transcripts against the proxy."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def line(self, timeout: float = 10) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readline()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed(self, timeout: float = 10) -> bytes:
        """Everything until the server closes the connection."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


async def verify_agent(user: str, password: Secret) -> bool:
    return user == "agent" and password.reveal() == "agent-pw"


@pytest.mark.parametrize(("send", "expect", "closes"), [
    (b"a SELECT INBOX\r\n", b"a BAD Command not allowed before login.\r\n", False),
    (b"a LOGIN {999999999}\r\n", b"a BAD Literal too large.\r\n", True),
    (b"a LOGIN {999999999+}\r\n", b"a BAD Literal too large.\r\n", True),
    (b"a LOGIN " + b"x" * 9000 + b"\r\n", b"* BYE Command line too long.\r\n", True),
    (b'a LOGIN "alice\r\nb DELETE INBOX" "alice-pw"\r\n',
     b"a BAD Unterminated quoted string.\r\n", False),
    (b'a LOGIN "al\rice" "alice-pw"\r\n', b"a BAD CR, LF or NUL inside a quoted string.\r\n",
     False),
])
async def test_imap_bad_input_answered_by_relay(dc: Dovecot, send: bytes, expect: bytes,
                                                closes: bool) -> None:
    async with run_proxy(dc) as r:
        c = await Client.open(r.port)
        assert (await c.line()).startswith(b"* OK [CAPABILITY")
        await c.send(send)
        assert await c.line() == expect
        if closes:
            rest = await c.closed()
            assert b"OK" not in rest
        else:
            await c.send(b"z NOOP\r\n")
            got = await c.line()
            while not got.startswith(b"z "):            # the injected half is refused too
                assert b" BAD " in got
                got = await c.line()
            assert got == b"z OK NOOP completed.\r\n"
        c.close()
        assert r.transport.connects == 0


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_plaintext_pipelined_after_starttls_is_discarded(dc: Dovecot, relay_cert: tuple,
                                                               protocol: str) -> None:
    async with run_proxy(dc, relay_cert, protocol=protocol, tls="starttls") as r:
        c = await Client.open(r.port)
        await c.line()
        if protocol == "imap":
            await c.send(b"a STARTTLS\r\nb LOGIN alice alice-pw\r\n")
            assert await c.line() == b"a OK Begin TLS negotiation now.\r\n"
        else:
            await c.send(b"STLS\r\nUSER alice\r\nPASS alice-pw\r\n")
            assert await c.line() == b"+OK Begin TLS negotiation now.\r\n"
        ctx = ssl.create_default_context(cafile=str(dc.ca_file))
        await c.writer.start_tls(ctx, server_hostname="localhost")
        await c.send(b"c NOOP\r\n" if protocol == "imap" else b"STAT\r\n")
        # The injected login was never executed: the first answer is to the NOOP/STAT.
        reply = await c.line()
        if protocol == "imap":
            assert reply == b"c OK NOOP completed.\r\n"
        else:
            assert reply == b"-ERR Command not allowed before login.\r\n"
        c.close()
        assert r.transport.connects == 0


async def test_pop3_bad_input(dc: Dovecot) -> None:
    async with run_proxy(dc, protocol="pop3") as r:
        c = await Client.open(r.port)
        assert (await c.line()).startswith(b"+OK")
        await c.send(b"RETR 1\r\n")
        assert await c.line() == b"-ERR Command not allowed before login.\r\n"
        await c.send(b"USER " + b"x" * 9000 + b"\r\n")
        assert await c.line() == b"-ERR Line too long.\r\n"
        assert await c.closed() == b""
        assert r.transport.connects == 0


async def test_failed_logins_are_slowed_then_refused_per_address(dc: Dovecot) -> None:
    async with run_proxy(dc, auth="password", username="alice", password="alice-pw",
                         verify=verify_agent, auth_fail_limit=3, fail_delay=0.3) as r:
        c = await Client.open(r.port)
        await c.line()
        took = []
        for tag in (b"a", b"b"):
            start = time.monotonic()
            await c.send(tag + b" LOGIN agent wrong\r\n")
            assert await c.line() == tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
            took.append(time.monotonic() - start)
        assert took[0] < 0.25 <= 0.3 <= took[1] + 0.01
        await c.send(b"c LOGIN agent wrong\r\n")
        assert (await c.line()).startswith(b"c NO [UNAVAILABLE] Too many failed logins")
        assert (await c.closed()).startswith(b"* BYE")
        # A new connection from the same address is refused, even with the right password.
        c = await Client.open(r.port)
        assert await c.line() == b"* BYE [UNAVAILABLE] Too many failed logins, try again later.\r\n"
        assert await c.closed() == b""
        assert r.transport.connects == 0
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": "imap-in", "reason": "bad_credentials"}) == 3


async def test_session_limits_per_client_and_total(dc: Dovecot) -> None:
    async with run_proxy(dc, max_connections_per_client=2, max_connections=3) as r:
        a, b = await Client.open(r.port), await Client.open(r.port)
        assert (await a.line()).startswith(b"* OK") and (await b.line()).startswith(b"* OK")
        c = await Client.open(r.port)
        assert await c.line() == b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
        assert await c.closed() == b""
        a.close()
        await a.writer.wait_closed()
        await until(lambda: r.listener.session_count == 1)
        d = await Client.open(r.port)
        assert (await d.line()).startswith(b"* OK")
        b.close()
        d.close()


async def test_pre_login_and_post_login_idle_timeouts(dc: Dovecot) -> None:
    async with run_proxy(dc, login_timeout=0.5, idle_timeout=1.0) as r:
        c = await Client.open(r.port)
        await c.line()
        start = time.monotonic()
        assert await c.closed() == b"* BYE Disconnected for inactivity.\r\n"
        assert 0.4 < time.monotonic() - start < 5
        c = await Client.open(r.port)
        await c.line()
        await c.send(b"a LOGIN alice alice-pw\r\n")
        assert (await c.line()).startswith(b"a OK")
        start = time.monotonic()
        await c.closed()                                     # relay hangs up when idle
        assert 0.9 < time.monotonic() - start < 5
        assert r.transport.connects == 1


@pytest.mark.parametrize("login", [
    [b"a LOGIN {5}\r\n", b"alice {8}\r\n", b"alice-pw\r\n"],             # synchronising
    [b"a LOGIN {5+}\r\nalice {8+}\r\nalice-pw\r\n"],                     # LITERAL+
    [b"a AUTHENTICATE PLAIN " + base64.b64encode(b"\0alice\0alice-pw") + b"\r\n"],
    [b"a AUTHENTICATE PLAIN\r\n", base64.b64encode(b"alice\0alice\0alice-pw") + b"\r\n"],
    [b"a AUTHENTICATE LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n",
     base64.b64encode(b"alice-pw") + b"\r\n"],
])
async def test_every_imap_login_form_reaches_dovecot(dc: Dovecot, login: list[bytes]) -> None:
    async with run_proxy(dc) as r:
        c = await Client.open(r.port)
        await c.line()
        for part in login:
            await c.send(part)
            if part is not login[-1]:
                assert (await c.line()).startswith(b"+")
        reply = await c.line()
        while not reply.startswith(b"a "):
            reply = await c.line()
        assert reply.startswith(b"a OK [CAPABILITY IMAP4rev1")
        await c.send(b"b LOGOUT\r\n")
        assert b"\r\nb OK Logout completed" in await c.closed()


@pytest.mark.parametrize("login", [
    [b"USER alice\r\n", b"PASS alice-pw\r\n"],
    [b"AUTH PLAIN " + base64.b64encode(b"\0alice\0alice-pw") + b"\r\n"],
    [b"AUTH LOGIN\r\n", base64.b64encode(b"alice") + b"\r\n",
     base64.b64encode(b"alice-pw") + b"\r\n"],
])
async def test_every_pop3_login_form_reaches_dovecot(dc: Dovecot, login: list[bytes]) -> None:
    async with run_proxy(dc, protocol="pop3") as r:
        c = await Client.open(r.port)
        await c.line()
        for part in login[:-1]:
            await c.send(part)
            assert (await c.line()).startswith(b"+")
        await c.send(login[-1] + b"STAT\r\n")                # pipelined after the login
        assert await c.line() == b"+OK Logged in.\r\n"
        assert (await c.line()).startswith(b"+OK ")          # Dovecot answers the STAT
        await c.send(b"QUIT\r\n")
        assert (await c.closed()).startswith(b"+OK")
