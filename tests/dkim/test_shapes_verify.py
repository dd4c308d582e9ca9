"""Independent verifiers accept the fast signer's output on the awkward message shapes.

Perl's Mail::DKIM (RSA: Debian's release has no Ed25519) and dkimpy with PyNaCl
(Ed25519), with keys served by a private dnsmasq, verify relay's signatures over long
folded headers, empty bodies, trailing blank lines, whitespace runs and 8-bit content.
"""

from __future__ import annotations

import pytest

from relay.config.schema import HostPort
from relay.dns import Resolver
from tests.dkim.conftest import KeySet, dkimpy_verify, perl_verify, signer

HEAD = (b"From: =?utf-8?q?J=C3=B6rg?= <support@example.com>\r\n"
        b"To: Customer <customer@example.net>\r\n"
        b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
        b"Message-ID: <shapes@example.com>\r\n")
LONG_FOLDED = (b"Subject: " + b" ".join([b"a rather long subject"] * 12) + b"\r\n"
               b"References: " + b"\r\n\t".join(b"<%d.thread@example.com>" % i
                                                 for i in range(60)) + b"\r\n"
               b"X-Long:" + b"x" * 900 + b"\r\n")
SHAPES = {
    "long folded headers": HEAD + LONG_FOLDED + b"\r\nbody\r\n",
    "empty body": HEAD + b"Subject: nothing\r\n\r\n",
    "no body at all": HEAD + b"Subject: nothing",
    "trailing blank lines": HEAD + b"\r\nlast line  \r\n\r\n\r\n\r\n\r\n",
    "only blank lines": HEAD + b"\r\n\r\n\r\n\r\n",
    "8-bit content": HEAD + b"Subject: J\xc3\xb6rg's caf\xc3\xa9\r\n"
                     b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
                     b"caf\xc3\xa9  cr\xc3\xa8me \t br\xc3\xbbl\xc3\xa9e \t\r\n\xff\xfe\x80\r\n",
    "whitespace runs": HEAD + b"Subject:   spaced \t out  \r\n\r\n \t a  b\t\tc \r\n\t\r\n",
    "100 KB body": HEAD + b"\r\n" + b"The quick brown fox  \r\n" * 4600,
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_mail_dkim_verifies_rsa(shape: str, keyset: KeySet, dns: HostPort) -> None:
    data = SHAPES[shape]
    signed = signer(keyset.rsa).sign(data, sender_domain="example.com")
    assert perl_verify(signed, dns) == [("pass", "example.com", "rsa2026")]
    assert perl_verify(signed[:-3] + b"X" + signed[-2:], dns)[0][0] == "fail"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_dkimpy_verifies_ed25519(shape: str, keyset: KeySet, resolver: Resolver) -> None:
    data = SHAPES[shape]
    signed = signer(keyset.ed, keyset.rsa).sign(data, sender_domain="example.com")
    assert dkimpy_verify(signed, resolver) == [True, True]
