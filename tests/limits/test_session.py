"""Profile limits and SPF in a real SMTP session (relay's listener, aiosmtplib client)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from relay.checks.message import MessageChecks
from relay.checks.spf import SpfChecker
from relay.config.schema import HostPort, ListenerConfig, ProfileConfig
from relay.dns import Resolver
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.smtp.listener import SmtpListener
from tests.peers.dnsmasq import Zone, dnsmasq

GENESYS = ProfileConfig(name="genesys-agentless", max_recipients=1, max_subject_chars=400,
                        max_local_part=64, max_display_name=64, max_body_bytes=3 << 20,
                        allow_attachments=False)


class Recorder:
    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, bytes]] = []

    async def __call__(self, envelope: Envelope, data: bytes) -> str:
        self.messages.append((envelope, data))
        return f"Q{len(self.messages)}"


@pytest.fixture
async def relay(tmp_path: Path) -> AsyncIterator[tuple[int, Recorder]]:
    zone = Zone(domains=["spf.test"], txt={"pass.spf.test": "v=spf1 ip4:127.0.0.1 -all",
                                           "fail.spf.test": "v=spf1 ip4:192.0.2.1 -all"})
    with dnsmasq(tmp_path, zone) as dns:
        spf = SpfChecker(resolver=Resolver(servers=[dns], timeout=3), hostname="relay.test")
        cfg = ListenerConfig(name="inbound", protocol="smtp", listen=HostPort("127.0.0.1", 0),
                             auth="none", allow=(), relay_domains=("example.net",),
                             spf="reject", profile="genesys-agentless")
        rec = Recorder()
        listener = SmtpListener(cfg, hostname="relay.test", accept=rec, maillog=MailLog(),
                                checks=MessageChecks(profile=GENESYS, spf=spf,
                                                     spf_policy="reject"))
        await listener.start()
        try:
            yield listener.addresses[0][1], rec
        finally:
            await listener.stop_accepting()
            await listener.wait_closed(1.0)


def msg(subject: str = "Shipped") -> bytes:
    return (f"From: Shop <news@pass.spf.test>\r\nTo: c@example.net\r\nSubject: {subject}\r\n"
            f"Message-ID: <1@pass.spf.test>\r\n\r\nHello\r\n").encode()


async def client(port: int) -> aiosmtplib.SMTP:
    c = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10, start_tls=False,
                        local_hostname="mx.pass.spf.test")
    await c.connect()
    await c.ehlo()
    return c


async def test_spf_pass_is_tagged_under_the_received_line(relay: tuple[int, Recorder]) -> None:
    port, rec = relay
    c = await client(port)
    await c.sendmail("news@pass.spf.test", ["c@example.net"], msg())
    await c.quit()
    [(_env, data)] = rec.messages
    lines = data.split(b"\r\n")
    assert lines[0].startswith(b"Received: from mx.pass.spf.test")
    names = [ln.split(b":")[0] for ln in lines if ln and ln[:1] not in (b" ", b"\t")]
    assert names[:4] == [b"Received", b"Received-SPF", b"Authentication-Results", b"From"]
    assert b"spf=pass smtp.mailfrom=news@pass.spf.test" in data.replace(b"\r\n\t", b" ")


async def test_forged_results_for_relay_are_dropped(relay: tuple[int, Recorder]) -> None:
    port, rec = relay
    c = await client(port)
    forged = b"Authentication-Results: relay.test; spf=pass smtp.mailfrom=x@bank.example\r\n"
    await c.sendmail("news@pass.spf.test", ["c@example.net"], forged + msg())
    await c.quit()
    [(_env, data)] = rec.messages
    assert b"bank.example" not in data
    assert data.count(b"Authentication-Results: relay.test;") == 1


async def test_spf_fail_refused_at_mail_from(relay: tuple[int, Recorder]) -> None:
    port, rec = relay
    c = await client(port)
    code, text = await c.execute_command(b"MAIL", b"FROM:<news@fail.spf.test>")
    assert (code, text) == (550, "5.7.23 SPF validation failed")
    await c.quit()
    assert rec.messages == []


async def test_second_recipient_refused_452(relay: tuple[int, Recorder]) -> None:
    port, rec = relay
    c = await client(port)
    await c.mail("news@pass.spf.test")
    assert (await c.rcpt("a@example.net"))[0] == 250
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
        await c.rcpt("b@example.net")
    assert info.value.code == 452
    assert "4.5.3 Too many recipients; genesys-agentless allows 1" in info.value.message
    await c.data(msg())
    await c.quit()
    assert [e.recipients for e, _ in rec.messages] == [("a@example.net",)]


@pytest.mark.parametrize(("length", "ok"), [(400, True), (401, False)])
async def test_subject_boundary_in_session(relay: tuple[int, Recorder], length: int,
                                           ok: bool) -> None:
    port, rec = relay
    c = await client(port)
    if ok:
        await c.sendmail("news@pass.spf.test", ["c@example.net"], msg("s" * length))
        assert len(rec.messages) == 1
    else:
        with pytest.raises(aiosmtplib.SMTPDataError) as info:
            await c.sendmail("news@pass.spf.test", ["c@example.net"], msg("s" * length))
        assert (info.value.code, info.value.message) == (
            552, "5.3.4 Subject is 401 characters; genesys-agentless allows 400")
        assert rec.messages == []
    await c.quit()
