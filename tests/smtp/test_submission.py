"""Real clients submit through the listener: STARTTLS, implicit TLS, AUTH, the 250 reply."""

from __future__ import annotations

import smtplib
import ssl
from pathlib import Path

import aiosmtplib
import pytest

from relay.errors import SpoolError
from tests.smtp.conftest import PASSWORD, RawClient, Relay, StartRelay, run

MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n.dot line\r\n"


def client_ctx(relay: Relay) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    relay.ca.configure_trust(ctx)
    return ctx


def submit_starttls(relay: Relay, user: str, password: str, mech: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", relay.port, local_hostname="client.test",
                      timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        assert not s.has_extn("auth"), "AUTH must not be offered before TLS"
        s.starttls(context=client_ctx(relay))
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes"):
            assert s.has_extn(ext), ext
        assert not s.has_extn("starttls")
        s.user, s.password = user, password
        code, _ = s.auth(mech, getattr(s, f"auth_{mech.lower()}"), initial_response_ok=True)
        assert code == 235
        s.mail("a@example.com")
        s.rcpt("b@example.net")
        return s.data(MSG)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
async def test_starttls_auth_submission(start_relay: StartRelay, mech: str) -> None:
    relay = await start_relay()
    code, reply = await run(submit_starttls, relay, "alice", PASSWORD, mech)
    assert (code, reply) == (250, b"2.0.0 Ok: queued as TESTQ0001")
    [(env, data)] = relay.recorder.messages
    assert env.sender == "a@example.com" and env.recipients == ("b@example.net",)
    assert env.auth_user == "alice" and env.trusted and env.listener == "platform"
    assert env.client_ip == "127.0.0.1" and env.client_helo == "client.test"
    assert data.startswith(b"Received: from client.test ([127.0.0.1])\r\n\t(using TLSv1.")
    assert b"by relay.test (relay) with ESMTPSA;" in data
    assert data.endswith(MSG.replace(b"\r\n.dot", b"\r\n.dot")), data
    assert any("TESTQ0001: received client=127.0.0.1[platform] user=alice" in r
               for r in relay.maillog_records)


async def test_login_without_initial_response(start_relay: StartRelay) -> None:
    relay = await start_relay()

    def go() -> list[str]:
        import base64
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        assert c.cmd("STARTTLS").startswith("220")
        tls = client_ctx(relay).wrap_socket(c.sock, server_hostname="localhost")
        c.sock = tls
        c.cmd("EHLO x")
        assert c.cmd("STARTTLS") == "503 5.5.1 Error: TLS already active"
        out = [c.cmd("AUTH LOGIN")]
        out.append(c.cmd(base64.b64encode(b"bob").decode()))
        out.append(c.cmd(base64.b64encode(b"bobpw").decode()))
        out.append(c.cmd("AUTH PLAIN"))
        c.close()
        return out

    out = await run(go)
    assert out[:3] == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6",
                       "235 2.7.0 Authentication successful"]
    assert out[3] == "503 5.5.1 Error: already authenticated"


async def test_implicit_tls_with_aiosmtplib(start_relay: StartRelay) -> None:
    relay = await start_relay(tls="implicit")
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, use_tls=True,
                             tls_context=client_ctx(relay), timeout=10)
    await client.connect()
    assert "starttls" not in client.esmtp_extensions
    await client.login("alice", PASSWORD)
    errors, reply = await client.sendmail("a@example.com", ["b@example.net", "c@example.org"],
                                          MSG)
    await client.quit()
    assert errors == {} and reply == "2.0.0 Ok: queued as TESTQ0001"
    [(env, data)] = relay.recorder.messages
    assert env.recipients == ("b@example.net", "c@example.org")
    assert b"with ESMTPSA;" in data


async def test_auth_refused_before_tls(start_relay: StartRelay) -> None:
    relay = await start_relay()

    def go() -> tuple[str, str]:
        c = RawClient(relay.port)
        c.reply()
        ehlo = c.cmd("EHLO x")
        r = c.cmd("AUTH PLAIN AGFsaWNlAHMzY3JldA==")
        c.close()
        return ehlo, r

    ehlo, r = await run(go)
    assert "AUTH" not in ehlo and "STARTTLS" in ehlo
    assert r == "538 5.7.11 Encryption required for requested authentication mechanism"


async def test_plaintext_auth_where_allowed(start_relay: StartRelay) -> None:
    relay = await start_relay(tls="none", cert=None, key=None, allow_plaintext_auth=True)

    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.login("bob", "bobpw")
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            return s.data(MSG)

    assert (await run(go))[0] == 250
    assert b"with ESMTPA;" in relay.recorder.messages[0][1]


async def test_allowlisted_client_relays_without_auth(start_relay: StartRelay) -> None:
    import ipaddress
    relay = await start_relay(allow=(ipaddress.ip_network("127.0.0.0/8"),))

    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.ehlo()
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            return s.data(MSG)

    assert (await run(go))[0] == 250
    env, data = relay.recorder.messages[0]
    assert env.trusted and env.auth_user == ""
    assert b"with ESMTP;" in data


@pytest.mark.parametrize(("error", "reply", "reason"), [
    (SpoolError("ENOSPC", disk_full=True), "452 4.3.1 Insufficient system storage",
     "spool_full"),
    (SpoolError("EIO"), "451 4.3.0 Error: local error in processing; try again later",
     "spool_error"),
    (RuntimeError("bug"), "451 4.3.0 Error: local error in processing; try again later",
     "error"),
])
async def test_spool_failures_map_to_replies(start_relay: StartRelay, error: Exception,
                                             reply: str, reason: str) -> None:
    import ipaddress
    relay = await start_relay(allow=(ipaddress.ip_network("127.0.0.1/32"),))
    relay.recorder.fail = error

    def go() -> list[str]:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        first = c.cmd("Subject: x\r\n\r\nbody\r\n.")
        relay.recorder.fail = None
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        second = c.cmd("Subject: y\r\n\r\nbody\r\n.")
        c.close()
        return [first, second]

    first, second = await run(go)
    assert first == reply
    assert second == "250 2.0.0 Ok: queued as TESTQ0001"
    assert relay.refused(reason) == 1


async def test_reload_swaps_the_implicit_tls_certificate(start_relay: StartRelay,
                                                         tmp_path: Path) -> None:
    import dataclasses

    import trustme

    relay = await start_relay(tls="implicit")
    new_ca = trustme.CA()
    leaf = new_ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "new.crt", tmp_path / "new.key"
    cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    relay.listener.reconfigure(dataclasses.replace(relay.listener.config, cert=cert, key=key),
                               users=None)

    def handshake(ca: trustme.CA) -> str:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP_SSL("127.0.0.1", relay.port, context=ctx, timeout=10) as s:
            return s.ehlo()[1].decode().splitlines()[0]

    assert await run(handshake, new_ca) == "relay.test"
    with pytest.raises(ssl.SSLCertVerificationError):
        await run(handshake, relay.ca)
