"""A Zendesk message through TLS + AUTH + DKIM signing to a recording upstream, byte for byte.

The platform submits over STARTTLS with AUTH to relay's real listener; the accept step signs
(the last change relay makes) and checks the protected headers; relay's real deliverer sends
the result to a recording SMTP upstream. What the upstream receives must be exactly what
relay produced, the protected header lines must be the platform's own bytes, and the
signature must verify with Mail::DKIM against a real DNS server.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay.config.schema import HostPort, ListenerConfig, UpstreamConfig
from relay.dkim.keys import DkimKey, DkimKeys, generate
from relay.dkim.sign import Signer
from relay.envelope import Envelope
from relay.headers import HeaderGuard, protected_lines, split
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.outbound.attempt import Deliverer
from relay.smtp.listener import SmtpListener
from relay.spool.records import QueuedMessage, QueueState, Recipient
from relay.transports.direct import DirectTransport
from relay.users import UserDB, hash_password, write_users
from tests.dkim.conftest import perl_verify
from tests.fakes.recording_upstream import RecordingUpstream
from tests.headers.test_headers import PROTECTED, ZENDESK
from tests.peers.dnsmasq import Zone, dnsmasq

UNFOLDED = (ZENDESK.replace(b"In-Reply-To:\r\n <ticket", b"In-Reply-To: <ticket")
            .replace(b"\r\n <ticket-4711-reply-1", b" <ticket-4711-reply-1")
            .replace(b"\r\n\t<ticket-4711-reply-2", b" <ticket-4711-reply-2"))
KEY = DkimKey("example.com", "zd1", "rsa-sha256", generate("rsa"))


class Relay:
    """listener → accept (guard + sign) → kept for the deliverer."""

    def __init__(self, metrics: Metrics) -> None:
        self.signer = Signer(DkimKeys([KEY]), metrics=metrics)
        self.guard = HeaderGuard(metrics=metrics)
        self.stored: list[tuple[Envelope, bytes, bytes]] = []

    async def accept(self, envelope: Envelope, data: bytes) -> str:
        out = await self.signer.maybe_sign(envelope, data)
        assert self.guard.check(data, out, queue_id=f"Q{len(self.stored)}")
        self.stored.append((envelope, data, out))
        return f"Q{len(self.stored)}"


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[tuple[int, Relay, Metrics, trustme.CA]]:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    users = tmp_path / "users"
    write_users(users, {"zendesk": hash_password(b"s3cret pass")})
    cfg = ListenerConfig(name="platform", protocol="smtp", listen=HostPort("127.0.0.1", 0),
                         tls="starttls", cert=tmp_path / "relay.pem", key=tmp_path / "relay.key",
                         auth="required", users_file=users)
    metrics = Metrics()
    relay = Relay(metrics)
    listener = SmtpListener(cfg, hostname="relay.test", accept=relay.accept,
                            maillog=MailLog(), users=UserDB.load(users), metrics=metrics)
    await listener.start()
    try:
        yield listener.addresses[0][1], relay, metrics, ca
    finally:
        await listener.stop_accepting()
        await listener.wait_closed(1.0)


@pytest.mark.parametrize("message", [ZENDESK, UNFOLDED], ids=["folded", "unfolded"])
async def test_zendesk_message_byte_for_byte(tmp_path: Path, message: bytes,
                                             setup: tuple[int, Relay, Metrics, trustme.CA]
                                             ) -> None:
    port, relay, metrics, ca = setup
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True,
                               tls_context=client_tls, timeout=20) as c:
        await c.login("zendesk", "s3cret pass")
        await c.sendmail("support@example.com", ["customer@example.net"], message,
                         mail_options=["BODY=8BITMIME"])
    [(envelope, received, signed)] = relay.stored
    assert envelope.trusted and envelope.auth_user == "zendesk"
    # relay received exactly the platform's bytes, under its own Received line
    assert received.endswith(message)
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(received)

    upstream = RecordingUpstream()
    await upstream.start()
    try:
        deliverer = Deliverer(
            upstreams=[UpstreamConfig(name="provider", protocol="smtp", host="127.0.0.1",
                                      port=upstream.port, tls="none")],
            transport_for=lambda _u: DirectTransport(), hostname="relay.test")
        msg = QueuedMessage("Q1", envelope, QueueState([Recipient("customer@example.net")]),
                            len(signed))
        results = await deliverer.deliver("provider", msg, signed, ["customer@example.net"])
        await deliverer.close()
    finally:
        await upstream.stop()
    assert results["customer@example.net"].code == 250
    [got] = upstream.received
    assert got.data == signed                                    # byte for byte
    assert protected_lines(got.data) == protected_lines(message)
    if message is ZENDESK:
        assert protected_lines(got.data) == PROTECTED
    assert got.data[split(got.data)[1]:] == message[split(message)[1]:]   # body untouched
    assert metrics.registry.get_sample_value("relay_protected_header_violations_total") == 0
    assert metrics.registry.get_sample_value(
        "relay_dkim_signatures_total", {"domain": "example.com", "result": "signed"}) == 1

    zone = Zone(domains=["example.com"], txt={KEY.record_name: KEY.record()})
    with dnsmasq(tmp_path, zone) as dns:
        assert perl_verify(got.data, dns) == [("pass", "example.com", "zd1")]
    assert time.time() - envelope.received_at < 120
