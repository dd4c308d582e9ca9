"""Upstream faults explained (refused, TLS name); reconfigure with sessions open, new certs."""

from __future__ import annotations

import asyncio
import dataclasses
import imaplib
import logging
import socket
import ssl
from pathlib import Path

import pytest
import trustme

from relay.config.schema import HostPort, ListenerConfig, UpstreamConfig
from relay.errors import ConfigError
from relay.metrics import Metrics
from relay.proxy.accounts import PassthroughAuthenticator
from relay.proxy.listener import ProxyListener
from relay.transports.direct import DirectTransport
from tests.peers import free_port
from tests.peers.dovecot import Dovecot


def configs(dc: Dovecot, **up: object) -> tuple[ListenerConfig, UpstreamConfig]:
    opts: dict[str, object] = {"host": "localhost", "port": dc.imap, "tls": "none",
                               "ca_file": dc.ca_file, "auth": "passthrough",
                               "connect_timeout": 5, "command_timeout": 10}
    opts.update(up)
    upstream = UpstreamConfig(name="dovecot", protocol="imap", **opts)  # type: ignore[arg-type]
    listener = ListenerConfig(name="imap-in", protocol="imap",
                              listen=HostPort("127.0.0.1", 0), upstream="dovecot")
    return listener, upstream


def login(port: int) -> str:
    m = imaplib.IMAP4("127.0.0.1", port)
    try:
        typ, data = m.login("alice", "alice-pw")
        m.logout()
        return f"{typ} {data[0]!r}"
    except imaplib.IMAP4.error as exc:
        m.logout()
        return str(exc)


@pytest.mark.parametrize(("up", "reason", "says"), [
    ({"port": 1, "host": "127.0.0.1"}, "connect_refused", "connect to 127.0.0.1:1 failed"),
    ({"tls": "starttls", "tls_server_name": "imap.wrong.example"}, "tls_certificate",
     "expected imap.wrong.example"),
    ({"tls": "implicit", "port": "imap"}, "tls_failed", "TLS handshake"),
])
async def test_upstream_faults_are_classified(dc: Dovecot, caplog: pytest.LogCaptureFixture,
                                              up: dict[str, object], reason: str,
                                              says: str) -> None:
    caplog.set_level(logging.WARNING, logger="relay.proxy")
    if up.get("port") == "imap":
        up = {**up, "port": dc.imap}              # implicit TLS against a plaintext port
    lcfg, ucfg = configs(dc, **up)
    metrics = Metrics()
    transport = DirectTransport()
    listener = ProxyListener(lcfg, upstream=ucfg, authenticator=PassthroughAuthenticator(),
                             transport_for=lambda _u: transport, metrics=metrics)
    await listener.start()
    try:
        text = await asyncio.to_thread(login, listener.address[1])
    finally:
        await listener.stop_accepting()
        await listener.wait_closed(5)
    assert "UNAVAILABLE" in text
    assert metrics.registry.get_sample_value(
        "relay_proxy_login_failures_total", {"listener": "imap-in", "reason": reason}) == 1
    assert says in caplog.text and "hint:" in caplog.text
    assert "alice-pw" not in caplog.text


async def test_reconfigure_rebinds_and_moves_new_sessions(dc: Dovecot) -> None:
    lcfg, ucfg = configs(dc, host="127.0.0.1", port=free_port())     # nothing listens there
    transport = DirectTransport()
    listener = ProxyListener(lcfg, upstream=ucfg, authenticator=PassthroughAuthenticator(),
                             transport_for=lambda _u: transport)
    await listener.start()
    try:
        old_port = listener.address[1]
        assert "UNAVAILABLE" in await asyncio.to_thread(login, old_port)
        # Same address: the new upstream applies to the next session.
        _, good = configs(dc, tls="implicit", port=dc.imaps)
        await listener.reconfigure(lcfg, upstream=good,
                                   authenticator=PassthroughAuthenticator(),
                                   transport_for=lambda _u: transport)
        assert listener.address[1] == old_port
        assert (await asyncio.to_thread(login, old_port)).startswith("OK")
        # A new listen address rebinds; a session open on the old socket keeps working.
        r, w = await asyncio.open_connection("127.0.0.1", old_port)
        await r.readline()
        moved = dataclasses.replace(lcfg, listen=HostPort("127.0.0.1", free_port()))
        await listener.reconfigure(moved, upstream=good,
                                   authenticator=PassthroughAuthenticator(),
                                   transport_for=lambda _u: transport)
        assert listener.address[1] == moved.listen.port
        assert (await asyncio.to_thread(login, moved.listen.port)).startswith("OK")
        w.write(b"a LOGIN alice alice-pw\r\n")
        assert (await asyncio.wait_for(r.readline(), 10)).startswith(b"a OK")
        w.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", old_port)
    finally:
        await listener.stop_accepting()
        await listener.wait_closed(5)


async def test_reconfigure_reloads_the_listener_certificate(dc: Dovecot, tmp_path: Path) -> None:
    def cert_of(ca: trustme.CA, name: str) -> tuple[Path, Path]:
        issued = ca.issue_cert("localhost")
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return cert, key

    old_ca, new_ca = trustme.CA(), trustme.CA()
    lcfg, ucfg = configs(dc)
    first = dataclasses.replace(lcfg, tls="implicit", cert=cert_of(old_ca, "old")[0],
                                key=cert_of(old_ca, "old")[1])
    transport = DirectTransport()
    listener = ProxyListener(first, upstream=ucfg, authenticator=PassthroughAuthenticator(),
                             transport_for=lambda _u: transport)
    await listener.start()

    def handshake(ca: trustme.CA) -> bool:
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        try:
            with socket.create_connection(("127.0.0.1", listener.address[1]), timeout=5) as s, \
                    ctx.wrap_socket(s, server_hostname="localhost") as t:
                return t.recv(5) == b"* OK "
        except ssl.SSLCertVerificationError:
            return False

    try:
        assert await asyncio.to_thread(handshake, old_ca)
        cert, key = cert_of(new_ca, "new")
        await listener.reconfigure(dataclasses.replace(first, cert=cert, key=key), upstream=ucfg,
                                   authenticator=PassthroughAuthenticator(),
                                   transport_for=lambda _u: transport)
        assert await asyncio.to_thread(handshake, new_ca)
        assert not await asyncio.to_thread(handshake, old_ca)
        with pytest.raises(ConfigError, match="cannot load cert"):
            await listener.reconfigure(dataclasses.replace(first, cert=tmp_path / "missing"),
                                       upstream=ucfg, authenticator=PassthroughAuthenticator(),
                                       transport_for=lambda _u: transport)
        assert await asyncio.to_thread(handshake, new_ca)        # the old config stays
    finally:
        await listener.stop_accepting()
        await listener.wait_closed(5)
