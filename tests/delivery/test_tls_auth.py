"""Delivery over TLS (STARTTLS, implicit, verification failures) and AUTH (PLAIN, XOAUTH2)."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from pathlib import Path

import pytest
import trustme

from relay.config.schema import AccountConfig, ProxyConfig, Secret, TokenSourceConfig
from relay.metrics import Metrics
from relay.oauth.tokens import TokenSources
from relay.outbound.attempt import Deliverer
from relay.outbound.session import Credentials
from relay.outbound.session_setup import open_session
from relay.timing import StageTimer
from relay.transports.direct import DirectTransport
from relay.transports.factory import Transports
from tests.delivery.helpers import BODY, deliverer, message, sample, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers.dante import dante

# ---- TLS ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.test").configure_cert(ctx)
    return ctx


def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def test_starttls_verified(started: list[RecordingUpstream], ca: trustme.CA,
                                 tmp_path: Path) -> None:
    peer = await start(started, starttls=server_ctx(ca))
    up = upstream(peer.port, tls="starttls", ca_file=ca_file(ca, tmp_path),
                  tls_server_name="upstream.test")
    d = deliverer(up)
    res = await d.deliver("up", message(), BODY, ["bob@example.net"])
    assert res["bob@example.net"].ok, res
    raw = bytes(peer.raw[0])
    assert raw.count(b"EHLO relay.test\r\n") == 2 and b"STARTTLS\r\n" in raw
    assert b"MAIL FROM" not in raw.split(b"STARTTLS\r\n")[0]   # nothing sent in clear
    assert peer.received[0].data == BODY
    await d.close()


async def test_starttls_wrong_ca_defers(started: list[RecordingUpstream], ca: trustme.CA,
                                        tmp_path: Path) -> None:
    peer = await start(started, starttls=server_ctx(ca))
    other = trustme.CA()
    metrics = Metrics()
    up = upstream(peer.port, tls="starttls", ca_file=ca_file(other, tmp_path),
                  tls_server_name="upstream.test")
    d = deliverer(up, metrics=metrics)
    res = await d.deliver("up", message(), BODY, ["bob@example.net"])
    v = res["bob@example.net"]
    assert not v.ok and not v.permanent and v.reason == "tls_certificate"
    assert "certificate" in v.reply and "upstream.test" in v.reply
    assert sample(metrics, "relay_upstream_connection_failures_total", upstream="up",
                  reason="tls_certificate") == 1
    assert peer.received == []
    await d.close()


async def test_starttls_wrong_name_defers(started: list[RecordingUpstream], ca: trustme.CA,
                                          tmp_path: Path) -> None:
    peer = await start(started, starttls=server_ctx(ca))
    d = deliverer(upstream(peer.port, tls="starttls", ca_file=ca_file(ca, tmp_path),
                           tls_server_name="smtp.office365.com"))
    v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.reason == "tls_certificate" and not v.permanent
    assert "smtp.office365.com" in v.reply
    await d.close()


async def test_starttls_not_offered_defers(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port, tls="starttls"))
    v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.reason == "starttls_unavailable" and not v.permanent
    assert b"MAIL" not in bytes(peer.raw[0])
    await d.close()


async def test_verify_off_is_loud(started: list[RecordingUpstream], ca: trustme.CA,
                                  caplog: pytest.LogCaptureFixture) -> None:
    peer = await start(started, starttls=server_ctx(ca))
    d = deliverer(upstream(peer.port, tls="starttls", verify_tls=False))
    with caplog.at_level(logging.WARNING, logger="relay.delivery"):
        v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.ok
    assert "verification is OFF" in caplog.text
    await d.close()


async def test_implicit_tls(started: list[RecordingUpstream], ca: trustme.CA,
                            tmp_path: Path) -> None:
    peer = await start(started, implicit_tls=server_ctx(ca))
    d = deliverer(upstream(peer.port, tls="implicit", ca_file=ca_file(ca, tmp_path),
                           tls_server_name="upstream.test"))
    v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.ok, v
    assert b"STARTTLS" not in bytes(peer.raw[0])
    await d.close()


# ---- AUTH -----------------------------------------------------------------------------------

async def test_auth_plain_and_account_mapping(started: list[RecordingUpstream],
                                              caplog: pytest.LogCaptureFixture) -> None:
    peer = await start(started, users={"cc@example.com": "s3cret-pw",
                                       "sales@example.com": "other-pw"}, auth_required=True)
    up = upstream(peer.port, auth="password", username="cc@example.com",
                  password=Secret("s3cret-pw"))
    accounts = [AccountConfig(upstream="up", sender="sales@example.com",
                              username="sales@example.com", password=Secret("other-pw"))]
    d = deliverer(up, accounts=accounts)
    with caplog.at_level(logging.DEBUG):
        r1 = await d.deliver("up", message("Q1"), BODY, ["bob@example.net"])
        r2 = await d.deliver("up", message("Q2", sender="sales@example.com"), BODY,
                             ["bob@example.net"])
    assert r1["bob@example.net"].ok and r2["bob@example.net"].ok
    assert [m.auth_user for m in peer.received] == ["cc@example.com", "sales@example.com"]
    assert peer.connections == 2                      # sessions are per identity
    assert "s3cret-pw" not in caplog.text and "other-pw" not in caplog.text
    await d.close()


async def test_idle_session_of_another_identity_yields_its_slot(
        started: list[RecordingUpstream]) -> None:
    peer = await start(started, users={"cc@example.com": "pw1", "sales@example.com": "pw2"})
    up = upstream(peer.port, auth="password", username="cc@example.com", password=Secret("pw1"),
                  max_connections=1)
    accounts = [AccountConfig(upstream="up", user="sales", username="sales@example.com",
                              password=Secret("pw2"))]
    d = deliverer(up, accounts=accounts)
    for qid, user in (("Q1", ""), ("Q2", "sales"), ("Q3", "sales"), ("Q4", "")):
        v = (await d.deliver("up", message(qid, auth_user=user), BODY, ["b@example.net"]))
        assert v["b@example.net"].ok
    assert [m.auth_user for m in peer.received] == [
        "cc@example.com", "sales@example.com", "sales@example.com", "cc@example.com"]
    assert peer.connections == 3 and peer.max_open == 1
    await d.close()


async def test_auth_refused_defers_with_hint(started: list[RecordingUpstream],
                                             caplog: pytest.LogCaptureFixture) -> None:
    peer = await start(started, users={"cc@example.com": "right"}, auth_required=True)
    d = deliverer(upstream(peer.port, auth="password", username="cc@example.com",
                           password=Secret("wrong-password")))
    with caplog.at_level(logging.DEBUG):
        v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert not v.ok and not v.permanent and v.reason == "auth_failed"
    assert v.reply.startswith("535")
    assert "SMTP AUTH" in caplog.text                  # the Exchange Online hint
    assert "wrong-password" not in caplog.text
    await d.close()


async def test_auth_failure_suspends_only_that_identity(started: list[RecordingUpstream]
                                                         ) -> None:
    """Repeated wrong passwords could lock the mailbox out: one AUTH, then fail fast."""
    peer = await start(started, users={"cc@example.com": "right", "sales@example.com": "pw2"},
                       auth_required=True)
    up = upstream(peer.port, auth="password", username="cc@example.com",
                  password=Secret("wrong"))
    accounts = [AccountConfig(upstream="up", sender="sales@example.com",
                              username="sales@example.com", password=Secret("pw2"))]
    d = deliverer(up, accounts=accounts, suspend_for=60.0)
    for qid, reason in (("Q1", "auth_failed"), ("Q2", "suspended"), ("Q3", "suspended")):
        v = (await d.deliver("up", message(qid), BODY, ["b@example.net"]))["b@example.net"]
        assert v.reason == reason and v.reply.split(": ")[-1].startswith("535"), v
    assert d.suspension("up", message("Q5")) is not None     # what the scheduler waits for
    assert d.suspension("up", message("Q6", sender="sales@example.com")) is None
    assert peer.auth_attempts == [("PLAIN", "cc@example.com")]
    other = await d.deliver("up", message("Q4", sender="sales@example.com"), BODY,
                            ["b@example.net"])
    assert other["b@example.net"].ok                    # another mailbox is not suspended
    await d.close()


async def test_xoauth2(started: list[RecordingUpstream],
                       caplog: pytest.LogCaptureFixture) -> None:
    peer = await start(started, tokens={"cc@example.com": "ya29.good-token"},
                       auth_required=True)
    asked: list[str] = []

    async def token_for(source: str) -> str:
        asked.append(source)
        return "ya29.good-token"

    d = deliverer(upstream(peer.port, auth="xoauth2", username="cc@example.com",
                           token_source="o365"), token_for=token_for)
    with caplog.at_level(logging.DEBUG):
        v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.ok, v
    assert asked == ["o365"]
    assert peer.xoauth2_seen == ["user=cc@example.com\x01auth=Bearer ya29.good-token\x01\x01"]
    assert "ya29.good-token" not in caplog.text
    await d.close()


async def test_xoauth2_refused_answers_challenge(started: list[RecordingUpstream]) -> None:
    peer = await start(started, tokens={"cc@example.com": "good"}, auth_required=True)

    async def token_for(source: str) -> str:
        return "expired-token"

    d = deliverer(upstream(peer.port, auth="xoauth2", username="cc@example.com",
                           token_source="o365"), token_for=token_for)
    v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert not v.ok and not v.permanent and v.reason == "auth_failed"
    assert v.reply.startswith("535")
    # After the 334 JSON challenge relay sent one empty line, then got the final 535.
    assert peer.xoauth2_seen[-1] == "after-challenge:b''"
    raw = bytes(peer.raw[0])
    assert b"AUTH XOAUTH2 " in raw and raw.split(b"AUTH XOAUTH2 ", 1)[1].split(b"\r\n")[1] == b""
    await d.close()


async def test_implicit_tls_splits_handshake_and_greeting(ca: trustme.CA,
                                                          tmp_path: Path) -> None:
    """A provider slow to greet after a quick handshake: the wait is greeting, not tls."""
    async def slow_greeter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.4)                     # the behaviour under test
        writer.write(b"220 upstream.test ESMTP\r\n")
        await reader.readline()
        writer.write(b"250 upstream.test\r\n")
        await reader.read()
        writer.close()

    server = await asyncio.start_server(slow_greeter, "127.0.0.1", 0, ssl=server_ctx(ca))
    port = server.sockets[0].getsockname()[1]
    timer = StageTimer()
    up = upstream(port, tls="implicit", ca_file=ca_file(ca, tmp_path),
                  tls_server_name="upstream.test")
    session = await open_session(up, transport=DirectTransport(), helo_name="relay.test",
                                 credentials=Credentials(), timer=timer)
    assert timer.stages["greeting"] >= 0.4 > timer.stages["tls"]
    assert session.ssl_object is not None and session.tls_info["names"] == ["upstream.test"]
    assert session.tls_info["version"].startswith("TLSv1.")
    assert session.greeting.startswith("220 ")
    session.close()
    server.close()
    await server.wait_closed()


async def test_xoauth2_through_real_token_sources_and_transports(
        started: list[RecordingUpstream], tmp_path: Path) -> None:
    """The app's wiring: relay.oauth.TokenSources and relay.transports.factory.Transports."""
    token_file = tmp_path / "token"
    token_file.write_text("static-token-abc\n")
    sources = TokenSources([TokenSourceConfig(name="o365", kind="static", token_file=token_file)],
                           transports=Transports())
    peer = await start(started, tokens={"cc@example.com": "static-token-abc"},
                       auth_required=True)
    transports = Transports()
    up = upstream(peer.port, auth="xoauth2", username="cc@example.com", token_source="o365")
    d = Deliverer(upstreams=[up], transport_for=transports.for_upstream,
                  token_for=sources.token, hostname="relay.test")
    v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.ok, v
    # An expired static token: a classified, transient failure (never a bounce).
    token_file.write_text(json.dumps({"access_token": "old", "expires_at": time.time() - 5}))
    await d.close()                     # so the next attempt opens (and authenticates) anew
    v = (await d.deliver("up", message("Q2"), BODY, ["bob@example.net"]))["bob@example.net"]
    assert not v.ok and not v.permanent and v.reason == "oauth_failed", v
    await transports.close()


async def test_starttls_through_dante(started: list[RecordingUpstream], ca: trustme.CA,
                                      tmp_path: Path) -> None:
    """TLS to the provider over a SOCKS5 tunnel; a proxy refusal defers with its reason."""
    peer = await start(started, starttls=server_ctx(ca))
    with dante(tmp_path / "dante") as proxy:
        transports = Transports([ProxyConfig(
            name="corp", kind="socks5", host=proxy.host, port=proxy.port, username=proxy.user,
            password=Secret(proxy.password), remote_dns=False, connect_timeout=5.0)])
        metrics = Metrics()
        up = upstream(peer.port, tls="starttls", ca_file=ca_file(ca, tmp_path),
                      tls_server_name="upstream.test", via="corp")
        blocked = upstream(proxy.blocked_port, name="blocked", via="corp")
        d = Deliverer(upstreams=[up, blocked], transport_for=transports.for_upstream,
                      hostname="relay.test", metrics=metrics)
        v = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
        assert v.ok, v
        assert peer.received[0].data == BODY
        v = (await d.deliver("blocked", message(), BODY, ["bob@example.net"]))[
            "bob@example.net"]
        assert not v.ok and not v.permanent and v.reason.startswith("proxy_"), v
        assert sample(metrics, "relay_upstream_connection_failures_total", upstream="blocked",
                      reason=v.reason) == 1
        await d.close()
        await transports.close()
