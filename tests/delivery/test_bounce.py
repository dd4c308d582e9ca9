"""RFC 3464 DSNs: structure, status codes, headers only, never a bounce of a bounce."""

from __future__ import annotations

import email
import email.policy
import time
from pathlib import Path

import pytest

from relay.dkim.keys import DkimKey, DkimKeys, generate
from relay.dkim.sign import Signer
from relay.envelope import Envelope
from relay.outbound.dsn import Bouncer, Failure, build_dsn, headers_of, is_bounce
from relay.spool.store import Spool
from tests.delivery.helpers import BODY, message

pytestmark = pytest.mark.fast


class _Store:
    def __init__(self) -> None:
        self.stored: list[tuple[Envelope, bytes]] = []

    async def store(self, envelope: Envelope, data: bytes) -> str:
        self.stored.append((envelope, data))
        return f"DSN{len(self.stored)}"


@pytest.mark.parametrize(("reply", "expired", "status"), [
    ("550 5.1.1 <x@example.net>: user unknown", False, "5.1.1"),
    ("554 5.7.1 rejected", False, "5.7.1"),
    ("550 no enhanced code here", False, "5.0.0"),
    ("451 4.4.3 remote busy", True, "4.4.3"),
    ("connect to smtp.example.net:587 failed", True, "4.4.7"),
    ("554 5.6.0 bare CR", False, "5.6.0"),
])
def test_status_codes(reply: str, expired: bool, status: str) -> None:
    assert Failure("x@example.net", reply, expired=expired).status == status


def test_dsn_structure() -> None:
    msg = message("QID1", rcpts=("gone@example.net", "ok@example.net"))
    dsn = build_dsn(msg=msg, failures=[Failure("gone@example.net", "550 5.1.1 no\r\nsuch user",
                                               "smtp.example.net")],
                    data=BODY, hostname="relay.test", bounce_from="MAILER-DAEMON@relay.test")
    assert b"\n" not in dsn.replace(b"\r\n", b"")            # CRLF only, no bare LF/CR
    parsed = email.message_from_bytes(dsn, policy=email.policy.default)
    assert parsed["To"].addresses[0].addr_spec == "alice@example.com"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed.get_content_type() == "multipart/report"
    text, status, headers = parsed.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert headers.get_content_type() == "text/rfc822-headers"
    raw = dsn.decode()
    assert "Reporting-MTA: dns; relay.test" in raw
    assert "X-Relay-Queue-ID: QID1" in raw
    assert "Final-Recipient: rfc822; gone@example.net" in raw
    assert "Remote-MTA: dns; smtp.example.net" in raw
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in raw   # folded to one line
    assert "ok@example.net" not in raw
    assert "Subject: hello" in raw and "Hi Bob" not in raw


def test_headers_of_is_bounded_and_stops_at_blank_line() -> None:
    assert headers_of(BODY).endswith(b"Message-ID: <m1@example.com>\r\n")
    huge = b"X-Big: " + b"a" * 70000 + b"\r\nSubject: s\r\n\r\nbody"
    assert len(headers_of(huge)) <= 64 * 1024


def test_is_bounce() -> None:
    now = time.time()
    plain = Envelope(sender="a@example.com", recipients=("b@x.net",), received_at=now)
    assert not is_bounce(plain, BODY)
    assert is_bounce(Envelope(sender="", recipients=("b@x.net",), received_at=now), BODY)
    assert is_bounce(Envelope(sender="a@example.com", recipients=("b@x.net",),
                              received_at=now, dsn_of="Q1"), BODY)
    report = (b"From: x@example.com\r\nContent-Type: multipart/report;\r\n"
              b" report-type=delivery-status; boundary=b\r\n\r\n--b--\r\n")
    assert is_bounce(plain, report)
    assert is_bounce(plain, b"Auto-Submitted: auto-replied (vacation)\r\n\r\nx\r\n")
    assert not is_bounce(plain, b"Auto-Submitted: auto-generated\r\n\r\nx\r\n")
    assert not is_bounce(plain, b"Subject: x\r\n\r\nAuto-Submitted: auto-replied\r\n")


async def test_bouncer_queues_to_sender_once() -> None:
    store = _Store()
    bouncer = Bouncer(spool=store, hostname="relay.test")
    msg = message("QID2", smtputf8=False)
    dsn_id = await bouncer.bounce(msg, [Failure("bob@example.net", "550 5.1.1 gone")], BODY)
    assert dsn_id == "DSN1"
    env, data = store.stored[0]
    assert env.sender == "" and env.recipients == ("alice@example.com",)
    assert env.dsn_of == "QID2"
    assert b"From: Mail Delivery System <MAILER-DAEMON@relay.test>" in data
    # the DSN itself failing: nothing more is queued
    dsn_msg = message("DSN1", sender="", rcpts=("alice@example.com",), dsn_of="QID2")
    assert await bouncer.bounce(dsn_msg, [Failure("alice@example.com", "550 no")], data) is None
    assert len(store.stored) == 1


@pytest.mark.parametrize("signed", [False, True])
async def test_a_dsn_passes_the_spools_crlf_check(tmp_path: Path, signed: bool) -> None:
    """The bouncer does not vouch for its DSNs (``crlf_checked``): the real spool scans each
    for a bare CR or LF, and takes it, DKIM signature, multi-line reply, huge header and
    all."""
    spool = Spool(tmp_path / "spool")
    sign = None
    if signed:
        signer = Signer(DkimKeys([DkimKey(domain="relay.test", selector="s1",
                                          algorithm="ed25519", private=generate("ed25519"))]))
        sign = signer.maybe_sign
    bouncer = Bouncer(spool=spool, hostname="relay.test", sign=sign)
    original = b"X-Big: " + b"a" * 70000 + b"\r\n" + BODY
    failures = [Failure("bob@example.net", "550-5.1.1 no\r\n550 5.1.1 such\nuser\r",
                        "smtp.example.net"),
                Failure("carol@example.net", "connect failed", expired=True)]
    try:
        qid = await bouncer.bounce(message("QID4", rcpts=("bob@example.net",
                                                          "carol@example.net")),
                                   failures, original)
        assert qid is not None and spool.queue_ids() == [qid]
        dsn = await spool.read_message(qid)
        assert dsn.count(b"\n") == dsn.count(b"\r") == dsn.count(b"\r\n")
        assert b"Diagnostic-Code: smtp; 550-5.1.1 no 550 5.1.1 such user" in dsn
        assert dsn.startswith(b"DKIM-Signature: ") is signed
        assert spool.load(qid).envelope.dsn_of == "QID4"
    finally:
        spool.close()


def test_eight_bit_headers_are_marked() -> None:
    body = "Subject: Grüße\r\n\r\nx\r\n".encode()
    dsn = build_dsn(msg=message(), failures=[Failure("bob@example.net", "550 5.1.1 x")],
                    data=body, hostname="relay.test", bounce_from="m@relay.test")
    assert b"Content-Transfer-Encoding: 8bit" in dsn and "Grüße".encode() in dsn


def test_local_reasons_are_not_labelled_smtp() -> None:
    dsn = build_dsn(msg=message(), failures=[Failure(
        "bob@example.net", "connect to smtp.example.net:587 failed: refused (gave up after "
        "120 h in the queue)", expired=True)], data=BODY, hostname="relay.test",
        bounce_from="m@relay.test").decode()
    assert "Diagnostic-Code: X-Relay; connect to smtp.example.net:587 failed" in dsn
    assert "Status: 4.4.7" in dsn and "Action: failed" in dsn


async def test_bounces_are_dkim_signed_when_the_bounce_domain_has_a_key() -> None:
    import dkim

    from relay.dkim.keys import DkimKey, DkimKeys, generate, txt_record
    from relay.dkim.sign import Signer

    key = generate("rsa")
    signer = Signer(DkimKeys([DkimKey(domain="relay.test", selector="s1",
                                      algorithm="rsa-sha256", private=key)]))
    store = _Store()
    bouncer = Bouncer(spool=store, hostname="relay.test", sign=signer.maybe_sign)
    await bouncer.bounce(message("QID3", smtputf8=False),
                         [Failure("bob@example.net", "550 5.1.1 gone")], BODY)
    _, data = store.stored[0]
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=relay.test;")
    record = txt_record(key).encode()
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record
                       if name == b"s1._domainkey.relay.test." else None)
