"""Message structure through the real listener: the exact reply, one log line, a metric label,
and nothing in the spool; valid platform mail still goes in byte for byte."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relay.checks.message import MessageChecks
from relay.config.schema import STRUCTURE_LEVELS
from relay.spool.store import Spool
from tests.checks.test_structure import BAD, GENESYS_SHAPED, ZENDESK_SHAPED
from tests.smtp.conftest import RawClient, StartRelay, run

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)
# Bare line endings never reach the structure checks: the DATA reader refuses them first
# (the smuggling defence), with its own reply and reason.
BARE = "550 5.5.2 Error: bare <CR> or <LF> in message data; lines must end with <CR><LF>"
SMUGGLED = [
    ("bare-lf", b"From: a@example.com\r\nTo: b@example.net\r\n\r\nx\ny\r\n", BARE),
    ("bare-cr", b"From: a@example.com\r\nTo: b@example.net\r\nSubject: a\rBcc: c@x\r\n\r\n",
     BARE),
]


def transact(port: int, message: bytes) -> str:
    c = RawClient(port)
    c.reply()
    c.cmd("EHLO platform.test")
    assert c.cmd("MAIL FROM:<a@example.com>") == "250 2.1.0 Ok"
    assert c.cmd("RCPT TO:<b@example.net>") == "250 2.1.5 Ok"
    assert c.cmd("DATA").startswith("354")
    stuffed = message.replace(b"\r\n.", b"\r\n..")
    c.send((b"." if stuffed.startswith(b".") else b"") + stuffed + b".\r\n")
    reply = c.reply()
    assert c.cmd("QUIT").startswith("221")
    c.close()
    return reply


@pytest.mark.parametrize(("message", "reply"), [(m, r) for _, m, r in BAD + SMUGGLED],
                         ids=[i for i, _, _ in BAD + SMUGGLED])
async def test_refused_with_its_reply_and_nothing_stored(start_relay: StartRelay,
                                                         tmp_path: Path, message: bytes,
                                                         reply: str) -> None:
    spool = Spool(tmp_path / "spool")
    checks = MessageChecks(structure_checks=STRUCTURE_LEVELS["strict"])
    relay = await start_relay(allow=ALLOW, accept=spool.store, checks=checks)
    assert await run(transact, relay.port, message) == reply
    assert spool.queue_ids() == []
    root = tmp_path / "spool"
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []
    reason = "smuggling" if reply == BARE else "structure"
    [line] = [r for r in relay.maillog_records if "rejected" in r]
    assert line.startswith("NOQUEUE: rejected client=127.0.0.1[platform] stage=DATA "
                           f"reason={reason} reply=")
    assert reply in line.replace('\\"', '"')
    assert relay.refused(reason) == 1


@pytest.mark.parametrize("message", [ZENDESK_SHAPED, GENESYS_SHAPED], ids=["zendesk", "genesys"])
async def test_valid_platform_mail_is_stored_byte_for_byte(start_relay: StartRelay,
                                                           tmp_path: Path,
                                                           message: bytes) -> None:
    spool = Spool(tmp_path / "spool")
    checks = MessageChecks(structure_checks=STRUCTURE_LEVELS["strict"],
                           add_missing_headers=True, hostname="relay.test")
    relay = await start_relay(allow=ALLOW, accept=spool.store, checks=checks)
    reply = await run(transact, relay.port, message)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    [queue_id] = spool.queue_ids()
    stored = await spool.read_message(queue_id)
    assert stored.startswith(b"Received: from platform.test ([127.0.0.1])")
    assert stored.endswith(message)            # Date and Message-ID present: nothing added
    assert relay.refused("structure") == 0


async def test_level_off_lets_malformed_mail_through(start_relay: StartRelay,
                                                     tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relay = await start_relay(allow=ALLOW, accept=spool.store,
                              checks=MessageChecks(structure_checks=()))
    no_from = next(m for i, m, _ in BAD if i == "no-from")
    assert (await run(transact, relay.port, no_from)).startswith("250 ")
    assert len(spool.queue_ids()) == 1


BARE_MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: no date\r\n\r\nhi\r\n"


@pytest.mark.parametrize(("trusted", "enabled", "added"), [
    (True, True, True), (False, True, False), (True, False, False)],
    ids=["trusted", "untrusted-inbound", "switched-off"])
async def test_missing_date_and_message_id_are_added_for_submitted_mail(
        start_relay: StartRelay, tmp_path: Path, trusted: bool, enabled: bool,
        added: bool) -> None:
    spool = Spool(tmp_path / "spool")
    checks = MessageChecks(structure_checks=STRUCTURE_LEVELS["strict"],
                           add_missing_headers=enabled, hostname="relay.test")
    where = {"allow": ALLOW} if trusted else {"auth": "none", "relay_domains": ("example.net",)}
    relay = await start_relay(accept=spool.store, checks=checks, **where)
    assert (await run(transact, relay.port, BARE_MESSAGE)).startswith("250 ")
    [queue_id] = spool.queue_ids()
    stored = await spool.read_message(queue_id)
    head, _, body = stored.partition(b"\r\n\r\n")
    assert body == b"hi\r\n"
    original = BARE_MESSAGE.split(b"\r\n\r\n")[0]
    if not added:
        assert head.endswith(original)
        assert b"\r\nDate:" not in stored and b"Message-ID:" not in stored
        return
    client, _, extra = head.rpartition(original)
    assert client.startswith(b"Received: from platform.test")
    date, mid = extra.removeprefix(b"\r\n").split(b"\r\n")
    assert date.startswith(b"Date: ") and len(date) < 50
    assert mid.startswith(b"Message-ID: <") and mid.endswith(b"@relay.test>")
