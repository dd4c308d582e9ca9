"""relay's DKIM signatures, checked by independent verifiers against a real DNS server."""

from __future__ import annotations

import re

import dkim
import pytest

from relay.config.schema import HostPort
from relay.dkim.sign import OVERSIGNED, from_domain, header_list, parse
from relay.dkim.verify import verify
from relay.dns import Resolver
from relay.envelope import Envelope
from tests.dkim.conftest import KeySet, dkimpy_verify, perl_verify, signer
from tests.peers.dnsmasq import silent_dns

MESSAGE = (
    b"From: Support Team <support@example.com>\r\n"
    b"To: Customer <customer@example.net>\r\n"
    b"Subject: Your order   has shipped\r\n"
    b"\tand is on its way\r\n"
    b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
    b"Message-ID: <order-42@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Mailer: Zendesk Mailer\r\n"
    b"\r\n"
    b"Hello,  \r\n"
    b"your parcel is on its way.\r\n"
    b"\r\n"
    b"\r\n"
)


def sig_tags(signed: bytes, idx: int = 0) -> dict[bytes, bytes]:
    sigs = [v for n, v in parse(signed)[0] if n.lower() == b"dkim-signature"]
    return dkim.util.parse_tag_value(re.sub(rb"\s+", b"", sigs[idx]))


def test_rsa_signature_verifies_with_mail_dkim(keyset: KeySet, dns: HostPort) -> None:
    signed = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com")
    assert signed.endswith(MESSAGE)
    assert perl_verify(signed, dns) == [("pass", "example.com", "rsa2026")]


def test_ed25519_signature_verifies_with_dkimpy(keyset: KeySet, resolver: Resolver) -> None:
    signed = signer(keyset.ed).sign(MESSAGE, sender_domain="example.com")
    assert sig_tags(signed)[b"a"] == b"ed25519-sha256"
    assert dkimpy_verify(signed, resolver) == [True]
    assert dkimpy_verify(signed + b"tampered\r\n", resolver) == [False]


def test_dual_signature_both_verify(keyset: KeySet, dns: HostPort, resolver: Resolver) -> None:
    signed = signer(keyset.rsa, keyset.ed).sign(MESSAGE, sender_domain="example.com")
    assert [sig_tags(signed, i)[b"s"] for i in (0, 1)] == [b"rsa2026", b"ed2026"]
    assert dkimpy_verify(signed, resolver) == [True, True]
    results = perl_verify(signed, dns)
    assert ("pass", "example.com", "rsa2026") in results      # Debian's Mail::DKIM: no Ed25519
    assert [r.result for r in verify(signed, lookup=resolver.txt)] == ["pass", "pass"]


@pytest.mark.parametrize("added", [
    b"From: Attacker <boss@example.com>\r\n",
    b"Subject: Urgent: wire money\r\n",
    b"Reply-To: attacker@evil.test\r\n",
    b"Cc: someone@evil.test\r\n",
    b"To: another@evil.test\r\n",
    b"Date: Sun, 22 Nov 2026 09:00:00 +0000\r\n",
    b"Message-ID: <forged@evil.test>\r\n",
])
def test_identity_header_added_after_signing_breaks_it(
        keyset: KeySet, dns: HostPort, resolver: Resolver, added: bytes) -> None:
    signed = signer(keyset.rsa, keyset.ed).sign(MESSAGE, sender_domain="example.com")
    # added below the signatures, where a later hop would insert it
    tampered = re.sub(rb"(\r\nFrom: )", b"\r\n" + added.rstrip(b"\r\n") + rb"\1", signed, count=1)
    assert tampered != signed
    assert perl_verify(tampered, dns)[0][0] == "fail"
    assert dkimpy_verify(tampered, resolver) == [False, False]


# The input that made relay leave mail unsigned with no trace: dkimpy's parser gives up on
# a space before a colon, and from_domain() swallowed the error.
SPACE_BEFORE_COLON = (
    b"From: Support <support@example.com>\r\n"
    b"To: customer@example.net\r\n"
    b"Subject : Your ticket #42\r\n"
    b"X-Zendesk-Email-Id : 01HXYZ\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


def test_space_before_colon_is_signed_and_verifies(keyset: KeySet, dns: HostPort) -> None:
    assert from_domain(SPACE_BEFORE_COLON) == "example.com"
    signed = signer(keyset.rsa).sign(SPACE_BEFORE_COLON, sender_domain="example.com")
    assert signed.endswith(SPACE_BEFORE_COLON)
    assert b"subject" in sig_tags(signed)[b"h"].split(b":")
    assert perl_verify(signed, dns) == [("pass", "example.com", "rsa2026")]
    tampered = signed.replace(b"ticket #42", b"ticket #43")
    assert perl_verify(tampered, dns)[0][0] == "fail"


def test_body_change_breaks_it(keyset: KeySet, dns: HostPort) -> None:
    signed = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com")
    tampered = signed.replace(b"your parcel", b"your refund")
    assert perl_verify(tampered, dns)[0][0] == "fail"


def test_relaxed_canonicalisation_tolerates_refolding(keyset: KeySet, dns: HostPort) -> None:
    signed = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com")
    refolded = signed.replace(b"Your order   has shipped\r\n\tand", b"Your order has shipped and")
    refolded = refolded.replace(b"Hello,  \r\n", b"Hello,\r\n")
    assert perl_verify(refolded, dns) == [("pass", "example.com", "rsa2026")]


def test_lf_only_message(keyset: KeySet, dns: HostPort) -> None:
    lf = MESSAGE.replace(b"\r\n", b"\n")
    signed = signer(keyset.rsa).sign(lf, sender_domain="example.com")
    assert b"\r" not in signed
    assert perl_verify(signed, dns) == [("pass", "example.com", "rsa2026")]


@pytest.mark.fast
def test_tags_relaxed_no_length_and_header_list(keyset: KeySet) -> None:
    signed = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com")
    tags = sig_tags(signed)
    assert tags[b"c"] == b"relaxed/relaxed"
    assert b"l" not in tags
    assert tags[b"d"] == b"example.com"
    names = tags[b"h"].split(b":")
    # present identity headers twice, absent Reply-To/Cc once, MIME headers once, X- never
    assert names.count(b"from") == 2 and names.count(b"subject") == 2
    assert names.count(b"reply-to") == 1 and names.count(b"cc") == 1
    assert names.count(b"content-type") == 1 and names.count(b"mime-version") == 1
    assert b"x-mailer" not in names
    assert b"in-reply-to" not in names and b"references" not in names
    for line in signed.split(b"\r\n\r\n")[0].split(b"\r\n"):
        assert len(line) <= 78


@pytest.mark.fast
def test_header_list_counts_repeats() -> None:
    headers = [[b"Received", b" x"], [b"To", b" a"], [b"To", b" b"], [b"From", b" c"]]
    names = [n.decode() for n in header_list(headers)]
    assert names.count("to") == 3 and names.count("from") == 2
    assert "received" not in names
    assert set(names) <= OVERSIGNED | {"mime-version", "content-type"}


@pytest.mark.fast
@pytest.mark.parametrize(("header", "domain"), [
    (b"From: A <a@Example.COM>\r\n", "example.com"),
    (b"From: \"Doe, John\" <j@sub.example.com>\r\n", "sub.example.com"),
    (b"From: j@example.org (comment)\r\n", "example.org"),
    (b"From:\r\n =?utf-8?q?J=C3=B6rg?= <j@example.com>\r\n", "example.com"),
    (b"Subject: no from\r\n", None),
    (b"From: a@example.com\r\nFrom: b@example.org\r\n", None),
    # blanks before the colon (obsolete syntax) used to make the parser give up, and the
    # message left unsigned without a trace
    (b"From : A <a@example.com>\r\n", "example.com"),
    (b"Subject : hi\r\nFrom: a@example.com\r\n", "example.com"),
])
def test_from_domain(header: bytes, domain: str | None) -> None:
    assert from_domain(header + b"\r\nbody\r\n") == domain


@pytest.mark.fast
def test_should_sign_only_trusted_mail_with_a_key(keyset: KeySet) -> None:
    s = signer(keyset.rsa)
    trusted = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=0,
                       trusted=True)
    untrusted = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=0)
    assert s.should_sign(trusted, MESSAGE)
    assert not s.should_sign(untrusted, MESSAGE)
    other = MESSAGE.replace(b"support@example.com", b"support@example.org")
    assert not s.should_sign(trusted, other)
    # DMARC relaxed alignment: a subdomain's From is signed with the parent's key
    sub = MESSAGE.replace(b"support@example.com", b"support@mail.example.com")
    assert s.should_sign(trusted, sub)
    assert s.signing_domain("mail.example.com") == "example.com"
    assert s.signing_domain("com") is None


async def test_maybe_sign_and_sign_async(keyset: KeySet, dns: HostPort) -> None:
    s = signer(keyset.rsa)
    env = Envelope(sender="a@example.com", recipients=("b@example.net",), received_at=0,
                   trusted=True)
    signed = await s.maybe_sign(env, MESSAGE)
    assert signed.startswith(b"DKIM-Signature:")
    unsigned_env = Envelope(sender="a@example.com", recipients=("b@example.net",),
                            received_at=0)
    assert await s.maybe_sign(unsigned_env, MESSAGE) is MESSAGE
    assert perl_verify(await s.sign_async(MESSAGE, sender_domain="example.com"), dns)[0][0] \
        == "pass"


def test_relay_verifier_reports_each_signature(keyset: KeySet, resolver: Resolver) -> None:
    s = signer(keyset.rsa, keyset.ed)
    signed = s.sign(MESSAGE, sender_domain="example.com")
    assert [r.result for r in verify(signed, lookup=resolver.txt)] == ["pass", "pass"]
    bad = verify(signed.replace(b"parcel", b"refund"), lookup=resolver.txt)
    assert [r.reason for r in bad] == ["body hash mismatch"] * 2
    # a selector whose published record is another key
    stale = signer(keyset.other_rsa).sign(MESSAGE, sender_domain="example.com")
    [r] = verify(stale, lookup=resolver.txt)
    assert r.result == "fail" and r.selector == "stale"
    # no record at all
    nokey = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com").replace(
        b"s=rsa2026", b"s=gone")
    assert verify(nokey, lookup=resolver.txt)[0].result == "permerror"


def test_relay_verifier_dns_timeout_is_temperror(keyset: KeySet) -> None:
    signed = signer(keyset.rsa).sign(MESSAGE, sender_domain="example.com")
    with silent_dns() as hp:
        res = Resolver(servers=[hp], timeout=0.5)
        [r] = verify(signed, lookup=res.txt)
    assert r.result == "temperror"
    assert "timed out" in r.reason


async def test_inbound_authentication_results(keyset: KeySet, resolver: Resolver) -> None:
    from relay.dkim.verify import authentication_results, verify_async

    signed = signer(keyset.rsa, keyset.ed).sign(MESSAGE, sender_domain="example.com")
    results = await verify_async(signed.replace(b"parcel", b"refund"), lookup=resolver.txt)
    header = authentication_results(results, "relay.example.org").decode()
    assert header.startswith("Authentication-Results: relay.example.org;\r\n\t")
    assert header.count('dkim=fail reason="body hash mismatch" header.d=example.com') == 2
    assert header.endswith("header.a=ed25519-sha256\r\n")
    none = authentication_results([], "r").decode()
    assert none == "Authentication-Results: r;\r\n\tdkim=none\r\n"


def test_missing_to_date_message_id_may_be_added_downstream(keyset: KeySet,
                                                            dns: HostPort) -> None:
    bare = b"From: a@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    signed = signer(keyset.rsa).sign(bare, sender_domain="example.com")
    names = sig_tags(signed)[b"h"].split(b":")
    assert b"to" not in names and b"date" not in names and b"message-id" not in names
    added = signed.replace(b"\r\nFrom:", b"\r\nTo: undisclosed-recipients:;\r\n"
                           b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
                           b"Message-ID: <added@provider.example>\r\nFrom:", 1)
    assert perl_verify(added, dns) == [("pass", "example.com", "rsa2026")]
    # but a Reply-To, Cc or second Subject may not be
    for extra in (b"Reply-To: x@evil.test", b"Cc: x@evil.test", b"Subject: other"):
        tampered = signed.replace(b"\r\nFrom:", b"\r\n" + extra + b"\r\nFrom:", 1)
        assert perl_verify(tampered, dns)[0][0] == "fail"


@pytest.mark.fast
def test_a_line_that_is_no_field_cannot_be_signed(keyset: KeySet) -> None:
    from relay.errors import DkimError

    broken = b"From: a@example.com\r\nthis line has no colon\r\n\r\nbody\r\n"
    with pytest.raises(DkimError, match="the header line 'this line has no colon' is not a "):
        signer(keyset.rsa).sign(broken, sender_domain="example.com")
