"""SOCKS5 transport against a real Dante: success, each failure class, TLS over the tunnel."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme
from python_socks import ProxyError, ProxyTimeoutError

from relay.config.schema import ProxyConfig
from relay.errors import TransportError
from relay.tls import classify_tls_error, client_context, server_name
from relay.transports.socks5 import REPLY_CODES, Socks5Transport, classify_socks_error
from tests.peers import free_port
from tests.peers.dante import Dante
from tests.transports.helpers import (
    TLS_NAME,
    blackhole,
    proxy_config,
    smtp_server,
    upstream_config,
)


async def echo_through(sock: object, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(sock=sock)  # type: ignore[arg-type]
    writer.write(payload)
    await writer.drain()
    data = await reader.readexactly(len(payload))
    writer.close()
    await writer.wait_closed()
    return data


async def test_connects_through_dante_with_username(dante_proxy: Dante, echo_port: int) -> None:
    t = Socks5Transport(proxy_config(dante_proxy))
    sock, timings = await t.connect_timed("127.0.0.1", echo_port, timeout=10)
    assert set(timings) == {"proxy_connect", "proxy_handshake"}
    assert await echo_through(sock, b"hello through socks\r\n") == b"hello through socks\r\n"
    # Dante logged the authenticated user for this destination: it really went through it.
    log = dante_proxy.log.read_text()
    assert f"{dante_proxy.user}%" in log or dante_proxy.user in log
    assert f"127.0.0.1.{echo_port}" in log


async def test_remote_dns_passes_the_name_to_the_proxy(dante_proxy: Dante,
                                                        echo_port: int) -> None:
    t = Socks5Transport(proxy_config(dante_proxy))
    sock = await t.connect("localhost", echo_port, timeout=10)
    assert await echo_through(sock, b"x") == b"x"


async def test_wrong_password_is_the_cisco_authentication_failure(dante_proxy: Dante) -> None:
    # UCCX runtime log: "javax.mail.MessagingException: SOCKS : authentication failed"
    t = Socks5Transport(proxy_config(dante_proxy, password="wrong-password"))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 9, timeout=10)
    err = info.value
    assert err.reason == "proxy_auth_failed"
    assert "SOCKS : authentication failed" in str(err)
    assert f"user '{dante_proxy.user}'" in str(err)
    assert "wrong-password" not in err.explain()
    assert "username and password of [[proxy]] dante" in err.hint
    assert "env DANTE_PASSWORD" in err.hint


async def test_proxy_down_is_refused(dante_proxy: Dante) -> None:
    t = Socks5Transport(proxy_config(dante_proxy, port=free_port()))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", 25, timeout=5)
    assert info.value.reason == "proxy_unreachable"
    assert "connection refused" in str(info.value)
    assert "SOCKS5 proxy dante" in str(info.value)


async def test_proxy_blackholed_is_the_cisco_connect_timed_out(dante_proxy: Dante) -> None:
    # UCCX runtime log: "javax.mail.MessagingException: connect timed out"
    with blackhole() as port:
        t = Socks5Transport(proxy_config(dante_proxy, port=port, connect_timeout=0.5))
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TransportError) as info:
            await t.connect("127.0.0.1", 25, timeout=10)
        assert loop.time() - started < 5
    err = info.value
    assert err.reason == "proxy_unreachable"
    assert str(err).startswith("connect timed out")
    assert "firewall" in err.hint


async def test_destination_blocked_by_ruleset(dante_proxy: Dante) -> None:
    t = Socks5Transport(proxy_config(dante_proxy))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", dante_proxy.blocked_port, timeout=10)
    assert info.value.reason == "proxy_refused_ruleset"
    assert "not allowed by ruleset" in str(info.value)
    assert "socks pass" in info.value.hint


async def test_destination_refused_behind_proxy(dante_proxy: Dante) -> None:
    t = Socks5Transport(proxy_config(dante_proxy))
    with pytest.raises(TransportError) as info:
        await t.connect("127.0.0.1", free_port(), timeout=10)
    assert info.value.reason == "proxy_refused_connection_refused"
    assert "RFC 1928 reply 0x05" in str(info.value)


async def test_starttls_through_dante(dante_proxy: Dante, ca: trustme.CA,
                                      ca_file: Path) -> None:
    with smtp_server(ca) as (port, recorder):
        up = upstream_config(port, ca_file)
        t = Socks5Transport(proxy_config(dante_proxy))
        sock = await t.connect(up.host, up.port, timeout=10)
        smtp = aiosmtplib.SMTP(hostname=server_name(up), sock=sock, start_tls=False,
                               tls_context=client_context(up), timeout=10)
        await smtp.connect()
        await smtp.starttls()
        assert smtp.is_connected and smtp.get_transport_info("sslcontext") is not None
        await smtp.sendmail("a@example.com", ["b@example.net"], b"Subject: t\r\n\r\nbody\r\n")
        await smtp.quit()
    assert recorder.messages[0][1] == ["b@example.net"]


async def test_implicit_tls_through_dante(dante_proxy: Dante, ca: trustme.CA,
                                          ca_file: Path) -> None:
    with smtp_server(ca, implicit=True) as (port, _recorder):
        up = upstream_config(port, ca_file, tls="implicit")
        sock = await Socks5Transport(proxy_config(dante_proxy)).connect(up.host, up.port,
                                                                        timeout=10)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=client_context(up), server_hostname=server_name(up))
        assert (await reader.readline()).startswith(b"220 ")
        writer.close()


async def test_wrong_certificate_name_is_explained(dante_proxy: Dante, ca: trustme.CA,
                                                   ca_file: Path) -> None:
    with smtp_server(ca, names=("other.example",), implicit=True) as (port, _r):
        up = upstream_config(port, ca_file, tls="implicit")
        sock = await Socks5Transport(proxy_config(dante_proxy)).connect(up.host, up.port,
                                                                        timeout=10)
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            await asyncio.open_connection(sock=sock, ssl=client_context(up),
                                          server_hostname=TLS_NAME)
    err = classify_tls_error(info.value, TLS_NAME)
    assert err.reason == "tls_certificate"
    assert f"expected {TLS_NAME}" in str(err)


@pytest.mark.fast
@pytest.mark.parametrize("code", sorted(REPLY_CODES))
def test_every_rfc1928_reply_code_is_named(code: int) -> None:
    cfg = ProxyConfig(name="p", kind="socks5", host="127.0.0.1", port=1080)
    err = classify_socks_error(ProxyError("x", error_code=code), cfg, "h:25")
    reason, name, _hint = REPLY_CODES[code]
    assert err.reason == reason and reason.startswith("proxy_refused_")
    assert name in str(err) and f"0x{code:02x}" in str(err)
    assert err.hint


@pytest.mark.fast
def test_handshake_timeout_and_closed_connection_are_classified() -> None:
    cfg = ProxyConfig(name="p", kind="socks5", host="127.0.0.1", port=1080)
    assert classify_socks_error(ProxyTimeoutError("t"), cfg, "h:25").reason == "proxy_timeout"
    closed = classify_socks_error(ProxyError("Connection closed unexpectedly"), cfg, "h:25")
    assert closed.reason == "proxy_handshake_failed"
    none = classify_socks_error(
        ProxyError("No acceptable authentication methods were offered"), cfg, "h:25")
    assert none.reason == "proxy_auth_failed" and "requires authentication" in str(none)
