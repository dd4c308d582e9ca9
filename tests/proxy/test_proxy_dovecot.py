"""The proxy against real Dovecot: imaplib and poplib through relay, TLS, XOAUTH2, IDLE, 50 MB."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import imaplib
import logging
import os
import poplib
import socket
import stat
import uuid
from typing import Any

import pytest

from relay.config.schema import Secret
from tests.peers.dovecot import Dovecot
from tests.proxy.conftest import run_proxy, until


def message(subject: str, body: bytes = b"hello from the relay tests\r\n") -> bytes:
    return (f"From: a@example.com\r\nTo: b@example.com\r\nSubject: {subject}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.com>\r\n\r\n").encode() + body


def deliver_random(dc: Dovecot, mb: int, prefix: str = "mid") -> tuple[str, bytes]:
    """Put a message of ``mb`` MB of random bytes (base64, CRLF lines) in alice's INBOX."""
    subject = f"{prefix}-{uuid.uuid4().hex}"
    sent = message(subject, base64.encodebytes(os.urandom(mb * 1024 * 1024)).replace(
        b"\n", b"\r\n"))
    dc.deliver("alice", sent)
    return subject, sent


def imap_fetch_subject(m: imaplib.IMAP4, subject: str) -> bytes:
    typ, _ = m.select("INBOX")
    assert typ == "OK"
    typ, data = m.uid("SEARCH", "SUBJECT", f'"{subject}"')
    assert typ == "OK" and data[0], data
    uid = data[0].split()[-1]
    typ, data = m.uid("FETCH", uid, "(BODY.PEEK[])")
    assert typ == "OK"
    item = data[0]
    assert isinstance(item, tuple)
    return item[1]


async def test_imaplib_plain_passthrough_logs_and_counts(dc: Dovecot,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.proxy")
    subject = f"plain-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    async with run_proxy(dc) as r:
        def client() -> tuple[bytes, bytes]:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            assert "AUTH=PLAIN" in m.capabilities and "STARTTLS" not in m.capabilities
            typ, _ = m.login("alice", "alice-pw")
            assert typ == "OK"
            _, caps = m.capability()                    # Dovecot's post-login capabilities
            body = imap_fetch_subject(m, subject)
            m.logout()
            return caps[0], body
        caps, body = await asyncio.to_thread(client)
        assert b"IDLE" in caps and b"AUTH=PLAIN" not in caps
        assert body == sent
        await until(lambda: r.listener.session_count == 0)
        assert r.transport.connects == 1
        assert r.metric("relay_proxy_sessions_started_total", {"listener": "imap-in"}) == 1
        assert r.metric("relay_proxy_sessions", {"listener": "imap-in"}) == 0
        assert r.metric("relay_proxy_bytes_total",
                        {"listener": "imap-in", "direction": "to_client"}) > len(sent)
        assert r.metric("relay_proxy_upstream_connect_seconds_count",
                        {"upstream": "dovecot", "stage": "auth"}) == 1
    lines = [rec.getMessage() for rec in caplog.records if "proxy session" in rec.getMessage()]
    assert len(lines) == 1
    assert "user=alice" in lines[0] and "upstream=dovecot" in lines[0]
    assert "end=client_closed" in lines[0] or "end=upstream_closed" in lines[0]
    assert "alice-pw" not in caplog.text


@pytest.mark.parametrize(("tls", "up_tls"), [("starttls", "starttls"),
                                             ("implicit", "implicit"),
                                             ("starttls", "none")])
async def test_imaplib_tls_both_ways(dc: Dovecot, relay_cert: tuple, tls: str,
                                     up_tls: str) -> None:
    subject = f"tls-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    async with run_proxy(dc, relay_cert, tls=tls, up_tls=up_tls) as r:
        ctx = r.client_context(dc)

        def client() -> bytes:
            if tls == "implicit":
                m: imaplib.IMAP4 = imaplib.IMAP4_SSL("localhost", r.port, ssl_context=ctx)
            else:
                m = imaplib.IMAP4("localhost", r.port)
                assert "LOGINDISABLED" in m.capabilities
                with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
                    m.login("alice", "alice-pw")
                m.starttls(ctx)
            m.login("alice", "alice-pw")
            body = imap_fetch_subject(m, subject)
            m.logout()
            return body
        assert await asyncio.to_thread(client) == sent
    secured = "TLS" if up_tls != "none" else "secured"
    assert secured in dc.log_text()


@pytest.mark.parametrize(("tls", "up_tls"), [("none", "none"), ("starttls", "starttls"),
                                             ("implicit", "implicit")])
async def test_poplib_through_relay(dc: Dovecot, relay_cert: tuple, tls: str,
                                    up_tls: str) -> None:
    subject = f"pop-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    async with run_proxy(dc, relay_cert, protocol="pop3", tls=tls, up_tls=up_tls) as r:
        ctx = r.client_context(dc)

        def client() -> list[bytes]:
            if tls == "implicit":
                p: poplib.POP3 = poplib.POP3_SSL("localhost", r.port, context=ctx)
            else:
                p = poplib.POP3("localhost", r.port)
                if tls == "starttls":
                    assert "STLS" in p.capa()
                    p.stls(ctx)
            p.user("alice")
            p.pass_("alice-pw")
            count, _ = p.stat()
            bodies = [b"\r\n".join(p.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
            p.quit()
            return bodies
        assert sent in await asyncio.to_thread(client)


async def test_mapped_account_and_wrong_password_never_reaches_provider(dc: Dovecot) -> None:
    async def verify(user: str, password: Secret) -> bool:
        return user == "agent1" and password.reveal() == "agent-pw"

    subject = f"mapped-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("alice", sent)
    async with run_proxy(dc, auth="password", username="alice", password="alice-pw",
                         verify=verify) as r:
        def client() -> bytes:
            m = imaplib.IMAP4("127.0.0.1", r.port)
            with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
                m.login("agent1", "wrong")
            assert r.transport.connects == 0
            m.login("agent1", "agent-pw")
            body = imap_fetch_subject(m, subject)
            m.logout()
            return body
        assert await asyncio.to_thread(client) == sent
        assert r.transport.connects == 1
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": "imap-in", "reason": "bad_credentials"}) == 1


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_xoauth2_toward_dovecot(dc: Dovecot, protocol: str) -> None:
    async def verify(user: str, password: Secret) -> bool:
        return user == "agent2" and password.reveal() == "agent-pw"

    tokens: list[str] = []

    async def token_for(source: str) -> str:
        tokens.append(source)
        return "bob-token-1" if source == "bob-src" else "revoked-token"

    subject = f"xoauth2-{uuid.uuid4().hex}"
    sent = message(subject)
    dc.deliver("bob", sent)
    async with run_proxy(dc, protocol=protocol, up_tls="starttls", auth="xoauth2",
                         username="bob", token_source="bob-src", verify=verify,
                         token_for=token_for) as r:
        def client() -> bytes:
            if protocol == "imap":
                m = imaplib.IMAP4("127.0.0.1", r.port)
                m.login("agent2", "agent-pw")
                body = imap_fetch_subject(m, subject)
                m.logout()
                return body
            p = poplib.POP3("127.0.0.1", r.port)
            p.user("agent2")
            p.pass_("agent-pw")
            count, _ = p.stat()
            bodies = [b"\r\n".join(p.retr(i + 1)[1]) + b"\r\n" for i in range(count)]
            p.quit()
            return next(b for b in bodies if subject.encode() in b)
        assert await asyncio.to_thread(client) == sent
        assert tokens == ["bob-src"]
    assert "user=<bob>, method=XOAUTH2" in dc.log_text()

    # A token the provider refuses: the client is told to come back later (not its fault),
    # the operator gets the provider's reply in the log, and the metric names it.
    async with run_proxy(dc, protocol=protocol, auth="xoauth2", username="bob",
                         token_source="revoked", verify=verify, token_for=token_for) as r:
        def refused() -> str:
            if protocol == "imap":
                m = imaplib.IMAP4("127.0.0.1", r.port)
                with pytest.raises(imaplib.IMAP4.error) as exc:
                    m.login("agent2", "agent-pw")
                m.logout()
                return str(exc.value)
            p = poplib.POP3("127.0.0.1", r.port)
            p.user("agent2")
            with pytest.raises(poplib.error_proto) as perr:
                p.pass_("agent-pw")
            p.quit()
            return str(perr.value)
        text = await asyncio.to_thread(refused)
        assert "UNAVAILABLE" in text or "SYS/TEMP" in text
        assert r.metric("relay_proxy_login_failures_total",
                        {"listener": f"{protocol}-in", "reason": "auth_refused"}) == 1


async def test_idle_sees_a_message_delivered_while_idling(dc: Dovecot) -> None:
    async with run_proxy(dc) as r:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)

        async def until(prefix: bytes) -> bytes:
            async with asyncio.timeout(15):
                while True:
                    line = await reader.readline()
                    assert line, "connection closed"
                    if line.startswith(prefix) or prefix in line:
                        return line

        await until(b"* OK")
        writer.write(b"a LOGIN alice alice-pw\r\nb SELECT INBOX\r\n")   # pipelined
        assert b"[CAPABILITY" in await until(b"a ")
        await until(b"b OK")
        writer.write(b"c IDLE\r\n")
        await until(b"+ ")
        dc.deliver("alice", message(f"idle-{uuid.uuid4().hex}"))
        assert (await until(b"EXISTS")).startswith(b"* ")
        writer.write(b"DONE\r\n")
        await until(b"c OK")
        writer.write(b"d LOGOUT\r\n")
        await until(b"d OK")
        writer.close()


@pytest.fixture(scope="module")
def big(dc: Dovecot) -> tuple[str, bytes]:
    """A message over 50 MB in alice's INBOX."""
    subject, sent = deliver_random(dc, 38, "big")
    assert len(sent) > 50 * 1024 * 1024
    return subject, sent


@pytest.mark.parametrize(("tls", "kernel", "path"), [
    ("implicit", True, "transport"),         # TLS both ways: asyncio transports
    ("none", True, "kernel"),                # plain both ways: splice(2)
    ("none", False, "transport"),            # plain, kernel splice switched off
])
async def test_50_mb_message_fetched_intact(dc: Dovecot, relay_cert: tuple,
                                            big: tuple[str, bytes], tls: str, kernel: bool,
                                            path: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.proxy")
    subject, sent = big
    async with run_proxy(dc, relay_cert, tls=tls, up_tls=tls, kernel_splice=kernel) as r:
        ctx = r.client_context(dc)

        def client() -> bytes:
            if tls == "implicit":
                m: imaplib.IMAP4 = imaplib.IMAP4_SSL("localhost", r.port, ssl_context=ctx)
            else:
                m = imaplib.IMAP4("localhost", r.port)
            m.login("alice", "alice-pw")
            body = imap_fetch_subject(m, subject)
            m.logout()
            return body
        got = await asyncio.to_thread(client)
        await until(lambda: r.listener.session_count == 0)
        other = {"kernel": "transport", "transport": "kernel"}[path]
        assert r.metric("relay_proxy_splices_total", {"listener": "imap-in", "path": path}) == 1
        assert not r.metric("relay_proxy_splices_total", {"listener": "imap-in", "path": other})
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
    (line,) = [rec.getMessage() for rec in caplog.records if "proxy session" in rec.getMessage()]
    assert f"splice={path}" in line
    assert int(line.split("bytes_to_client=")[1].split()[0]) > len(sent)


def pipes() -> int:
    """Pipes this process holds open (the kernel splice's, the proxy running here)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")
    return count


async def test_a_spliced_session_keeps_its_pipes_between_bursts_and_drops_them_idle(
        dc: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer reuses one pipe per direction (not one per socket wakeup), and an idle
    logged-in session holds none once PIPE_IDLE has passed."""
    from relay.proxy import zerocopy
    monkeypatch.setattr(zerocopy, "PIPE_IDLE", 0.3)
    made: list[int] = []
    real = os.pipe2

    def counting(flags: int) -> tuple[int, int]:
        made.append(flags)
        return real(flags)
    monkeypatch.setattr(zerocopy.os, "pipe2", counting)
    subject, sent = deliver_random(dc, 3)
    async with run_proxy(dc, None, tls="none", up_tls="none", kernel_splice=True) as r:
        before = pipes()
        m = await asyncio.to_thread(imaplib.IMAP4, "localhost", r.port, timeout=30)
        try:
            await asyncio.to_thread(m.login, "alice", "alice-pw")
            got = await asyncio.to_thread(imap_fetch_subject, m, subject)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
            assert len(made) <= 6, f"{len(made)} pipes made for one 4 MB FETCH"
            await until(lambda: pipes() == before, timeout=5)     # idle: none held
            await asyncio.to_thread(m.noop)                        # and it still works
        finally:
            await asyncio.to_thread(m.logout)


def live_transports() -> int:
    gc.collect()                       # closed transports are cyclic garbage until collected
    return sum(isinstance(o, asyncio.Transport) for o in gc.get_objects())


async def test_an_idle_kernel_spliced_session_keeps_no_transport(dc: Dovecot) -> None:
    """Once the kernel moves a session's bytes, relay keeps neither side's asyncio transport
    (each held its socket object and address extras: most of an idle session's memory)."""
    async with run_proxy(dc, None, tls="none", up_tls="none", kernel_splice=True) as r:
        before = live_transports()
        clients = []
        try:
            for _ in range(3):
                m = await asyncio.to_thread(imaplib.IMAP4, "localhost", r.port, timeout=30)
                clients.append(m)
                await asyncio.to_thread(m.login, "alice", "alice-pw")
            await until(lambda: r.metric("relay_proxy_splices_total",
                                         {"listener": "imap-in", "path": "kernel"}) == 3)
            assert live_transports() == before
            for m in clients:
                typ, _ = await asyncio.to_thread(m.noop)        # and they still work
                assert typ == "OK"
        finally:
            for m in clients:
                await asyncio.to_thread(m.logout)


async def test_a_long_literal_wakes_relay_for_large_pieces_only(
        dc: Dovecot, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a FETCH's literal flows, the provider socket's SO_RCVLOWAT asks epoll to wake
    relay for large pieces; it is back to 1 for the small replies that follow."""
    from relay.proxy import zerocopy
    marks: list[tuple[int, int]] = []          # (SO_RCVLOWAT that woke the read, its fd)
    real = os.splice

    def observing(src: int, dst: int, count: int, *args: Any, **kw: Any) -> int:
        n = real(src, dst, count, *args, **kw)
        if not stat.S_ISFIFO(os.fstat(src).st_mode):       # socket → pipe
            sock = socket.socket(fileno=src)
            try:
                marks.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT), src))
            finally:
                sock.detach()
        return n
    monkeypatch.setattr(zerocopy.os, "splice", observing)
    subject, sent = deliver_random(dc, 6)
    async with run_proxy(dc, None, tls="none", up_tls="none", kernel_splice=True) as r:
        m = await asyncio.to_thread(imaplib.IMAP4, "localhost", r.port, timeout=30)
        try:
            await asyncio.to_thread(m.login, "alice", "alice-pw")
            got = await asyncio.to_thread(imap_fetch_subject, m, subject)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()
            during = [mark for mark, _ in marks]
            assert max(during) == zerocopy.LOWAT, during
            for _ in range(3):                      # small replies still wake relay
                typ, _ = await asyncio.to_thread(m.noop)
                assert typ == "OK"
            sock = socket.socket(fileno=marks[-1][1])   # the provider side, still open
            try:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            finally:
                sock.detach()
        finally:
            await asyncio.to_thread(m.logout)
