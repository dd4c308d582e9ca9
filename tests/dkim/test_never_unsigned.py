"""DKIM never skips silently: through relay's real listener, checks and accept pipeline,
every message accepted for a keyed domain carries a signature Mail::DKIM verifies (odd
header spacing included); one that cannot be signed is refused, or sent unsigned only
where the operator chose that, with a warning and a metric."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from relay.app.listeners import build_listeners
from relay.config.loader import load_config
from relay.config.schema import HostPort
from relay.dkim.keys import DkimKey, DkimKeys
from relay.dkim.sign import Signer
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp.listener import SmtpListener
from relay.spool.store import Spool
from relay.verdict import Refusal
from tests.dkim.conftest import KeySet, perl_verify, signer
from tests.peers import free_port
from tests.smtp.conftest import run
from tests.smtp.conftest import submit as submit_raw

Start = Callable[..., Any]
TRUSTED = Envelope(sender="support@example.com", recipients=("c@example.net",),
                   received_at=0, trusted=True)


def config_text(tmp: Path, keyset: KeySet, *, checks: str, on_failure: str) -> str:
    key = tmp / "example.com.key"
    key.write_bytes(keyset.rsa.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key.chmod(0o600)
    return f"""[relay]
hostname = "relay.test"
spool = "spool"
default_upstream = "out"

[metrics]
enabled = false

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{free_port()}"
auth = "none"
allow = ["127.0.0.0/8"]
structure_checks = "{checks}"

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"

[[dkim]]
domain = "example.com"
selector = "rsa2026"
key_file = "{key}"
on_failure = "{on_failure}"
"""


@pytest.fixture
async def start(tmp_path: Path, keyset: KeySet) -> AsyncIterator[Start]:
    listeners: list[SmtpListener] = []

    async def go(*, checks: str = "off", on_failure: str = "refuse"
                 ) -> tuple[int, Spool, Metrics]:
        work = tmp_path / f"relay{len(listeners)}"
        work.mkdir()
        conf = work / "relay.toml"
        conf.write_text(config_text(work, keyset, checks=checks, on_failure=on_failure))
        config = load_config(conf)
        spool = Spool(config.relay.spool)
        metrics = Metrics()
        [lp] = build_listeners(config, spool=spool, metrics=metrics).listeners.values()
        assert lp.accept is not None
        listener = SmtpListener(lp.cfg, hostname="relay.test", accept=lp.accept,
                                maillog=MailLog(), checks=lp.checks, metrics=metrics)
        await listener.start()
        listeners.append(listener)
        return listener.addresses[0][1], spool, metrics

    yield go
    for listener in listeners:
        await listener.stop_accepting()
        await listener.wait_closed(1.0)


def submit(port: int, message: bytes) -> str:
    return submit_raw(port, message, sender="support@example.com", recipient="c@example.net")


BODY = b"\r\nHello,\r\nyour ticket was updated.\r\n"
ODD = [
    ("plain", b"From: Support <support@example.com>\r\nTo: c@example.net\r\nSubject: hi\r\n"),
    ("space-before-colon", b"From : support@example.com\r\nTo: c@example.net\r\n"
     b"Subject : Ticket 42\r\nX-Zendesk-Email-Id  :\t01HX\r\n"),
    ("no-space-after-colon", b"From:support@example.com\r\nTo:c@example.net\r\nSubject:hi\r\n"),
    ("tabs-and-runs", b"From:\t Support \t <support@example.com>\r\nTo:  c@example.net  \r\n"
     b"Subject:\tmany    spaces\t \r\n"),
    ("upper-case-names", b"FROM: support@example.com\r\nTO: c@example.net\r\nSUBJECT: hi\r\n"),
    ("folded", b"From: Support\r\n <support@example.com>\r\nTo: c@example.net\r\n"
     b"Subject: a long\r\n\tfolded\r\n   subject\r\n"),
    ("empty-values", b"From: support@example.com\r\nTo: c@example.net\r\nSubject:\r\n"
     b"X-Empty:  \r\n"),
    ("subdomain-from", b"From: alerts@mail.example.com\r\nTo: c@example.net\r\n"),
    ("encoded-word", b"From: =?UTF-8?Q?J=C3=B6rg?= <support@example.com>\r\nTo: c@example.net\r\n"),
]


@pytest.mark.parametrize("head", [h for _, h in ODD], ids=[i for i, _ in ODD])
async def test_every_accepted_keyed_message_verifies(start: Start, dns: HostPort,
                                                     head: bytes) -> None:
    port, spool, metrics = await start()
    reply = await run(submit, port, head + BODY)
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    [queue_id] = spool.queue_ids()
    stored = await spool.read_message(queue_id)
    assert stored.startswith(b"DKIM-Signature: ") and stored.endswith(BODY)
    assert head in stored                      # the client's header, byte for byte
    # the Date: and Message-ID: relay added for the submission are signed too
    h = stored.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n\t", b"")
    assert b"date:date" in h and b"message-id:message-id" in h
    assert perl_verify(stored, dns) == [("pass", "example.com", "rsa2026")]
    assert metrics.registry.get_sample_value(
        "relay_dkim_signatures_total", {"domain": "example.com", "result": "signed"}) == 1


UNSIGNABLE = [
    ("no-colon", b"From: support@example.com\r\nTo: c@example.net\r\nnot a field\r\n",
     "550 5.7.0 message cannot be DKIM-signed for example.com: the header line 'not a field' "
     "is not a header field; a DKIM signature over it would not verify"),
    ("two-from", b"From: support@example.com\r\nFrom: other@example.org\r\nTo: c@example.net\r\n",
     "550 5.7.0 message cannot be DKIM-signed for example.com: the message has 2 From: fields"),
    ("unreadable-from", b'From: "unterminated <support@example.com>\r\nTo: c@example.net\r\n',
     "550 5.7.0 message cannot be DKIM-signed for example.com: its From: field cannot be read "
     "as an address"),
]


@pytest.mark.parametrize(("head", "reply"), [(h, r) for _, h, r in UNSIGNABLE],
                         ids=[i for i, _, _ in UNSIGNABLE])
async def test_unsignable_keyed_message_is_refused(start: Start, head: bytes,
                                                   reply: str) -> None:
    port, spool, metrics = await start()
    assert await run(submit, port, head + BODY) == reply
    assert spool.queue_ids() == []
    assert metrics.registry.get_sample_value(
        "relay_dkim_signatures_total", {"domain": "example.com", "result": "refused"}) == 1
    assert metrics.registry.get_sample_value(
        "relay_messages_refused_total", {"listener": "platform", "reason": "dkim"}) == 1


async def test_send_unsigned_only_when_chosen_and_never_quietly(
        start: Start, caplog: pytest.LogCaptureFixture) -> None:
    port, spool, metrics = await start(on_failure="send-unsigned")
    head = UNSIGNABLE[0][1]
    with caplog.at_level(logging.WARNING, logger="relay.dkim"):
        reply = await run(submit, port, head + BODY)
    assert reply.startswith("250 ")
    [queue_id] = spool.queue_ids()
    stored = await spool.read_message(queue_id)
    assert b"DKIM-Signature" not in stored
    assert metrics.registry.get_sample_value(
        "relay_dkim_signatures_total", {"domain": "example.com", "result": "failed"}) == 1
    [warning] = [r.getMessage() for r in caplog.records if r.name == "relay.dkim"]
    assert warning.startswith("DKIM: a message from example.com is sent UNSIGNED: the "
                              "header line 'not a field' is not a header field")
    assert warning.endswith('(on_failure = "send-unsigned" for example.com)')


async def test_structure_checks_refuse_first_when_on(start: Start) -> None:
    port, spool, _ = await start(checks="standard")
    reply = await run(submit, port, UNSIGNABLE[1][1] + BODY)
    assert reply == "550 5.6.0 message has 2 From: header fields; RFC 5322 allows one"
    assert spool.queue_ids() == []


async def test_signing_error_is_a_temporary_refusal() -> None:
    class Broken:
        def sign(self, *args: object) -> bytes:
            raise ValueError("HSM unavailable")

    key = DkimKey("example.com", "rsa2026", "rsa-sha256", Broken())  # type: ignore[arg-type]
    with pytest.raises(Refusal) as info:
        await Signer(DkimKeys([key])).maybe_sign(TRUSTED, ODD[0][1] + BODY)
    assert info.value.reply == "451 4.7.0 DKIM signing for example.com failed; try again later"
    assert info.value.reason == "dkim"


@pytest.mark.fast
async def test_unkeyed_and_untrusted_mail_is_left_alone(keyset: KeySet) -> None:
    s = signer(keyset.rsa)
    other = b"From: a@example.org\r\nFrom: b@example.org\r\n" + BODY
    assert await s.maybe_sign(TRUSTED, other) is other
    # an address in the display name is not the From: domain (DMARC aligns with the
    # mailbox): not ours to sign, and not a reason to refuse
    via = b'From: "support@example.com via Zendesk" <noreply@zendesk.example>\r\n' + BODY
    assert await s.maybe_sign(TRUSTED, via) is via
    untrusted = Envelope(sender="x@example.com", recipients=("c@example.net",), received_at=0)
    broken = UNSIGNABLE[0][1] + BODY
    assert await s.maybe_sign(untrusted, broken) is broken
