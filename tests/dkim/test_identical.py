"""relay's fast signer makes the very signature dkimpy makes, byte for byte.

For generated messages (folded and 8-bit headers, repeated fields, empty bodies, trailing
blank lines, whitespace runs, LF-only messages) relay signs with a fixed clock; dkimpy
then recomputes that signature from scratch with its own parser, canonicalisation,
header hashing and signing (pure-Python RSA, PyNaCl for Ed25519) over the same key and
the same signature field: ``bh=`` and ``b=`` must come out identical. RSA PKCS#1 v1.5 and
Ed25519 are deterministic, so equal inputs give equal bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re

import dkim
import dkim.crypto
import nacl.signing
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from dkim.canonicalization import CanonicalizationPolicy
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dkim.keys import DkimKey, DkimKeys, generate
from relay.dkim.sign import Signer

pytestmark = pytest.mark.fast

RSA = DkimKey("example.com", "rsa", "rsa-sha256", generate("rsa"))
ED = DkimKey("example.com", "ed", "ed25519-sha256", generate("ed25519"))
NOW = 1_796_000_000

words = st.sampled_from(["order", "  two  spaces", "\ttab", "Jörg", "\u00e4\u00f6\u00fc", "x" * 90,
                         "=?utf-8?q?J=C3=B6rg?=", "a;b", " ", "trailing \t"])
names = st.sampled_from(["To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "References",
                         "MIME-Version", "Content-Type", "X-Mailer", "Received", "subject",
                         "In-Reply-To"])
body_lines = st.sampled_from([b"", b"Hello,  ", b"\tindented\t", b"caf\xc3\xa9 \xff",
                              b"A" * 998, b"end ", b" "])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    fields = [("From", " Support <support@example.com>")]
    for _ in range(draw(st.integers(0, 10))):
        value = " " + " ".join(draw(st.lists(words, min_size=1, max_size=12)))
        if draw(st.booleans()):          # fold it (long folded headers)
            parts = value.split(" ")
            value = "\r\n\t".join(" ".join(parts[i:i + 3]) for i in range(0, len(parts), 3))
        fields.insert(draw(st.integers(0, len(fields))), (draw(names), value))
    head = "".join(f"{n}:{v}\r\n" for n, v in fields).encode("utf-8")
    body = b"".join(line + b"\r\n" for line in draw(st.lists(body_lines, max_size=8)))
    body += draw(st.sampled_from([b"", b"\r\n", b"\r\n\r\n\r\n", b"no final CRLF"]))
    data = head + b"\r\n" + body
    return data.replace(b"\r\n", b"\n") if draw(st.booleans()) else data


def dkimpy_recomputes(signed: bytes, key: DkimKey) -> tuple[bytes, bytes]:
    """(bh, b) as dkimpy computes them for the topmost DKIM-Signature of ``signed``."""
    headers, body = dkim.rfc822_parse(signed)
    assert headers[0][0] == b"DKIM-Signature"
    tags = dkim.util.parse_tag_value(headers[0][1])
    policy = CanonicalizationPolicy.from_c_value(tags[b"c"])
    bh = base64.b64encode(hashlib.sha256(policy.canonicalize_body(body)).digest())
    include = [re.sub(rb"\s+", b"", h) for h in tags[b"h"].split(b":")]
    h = hashlib.sha256()              # dkimpy's signing path, as in DKIM.gen_header
    dkim.hash_headers(h, policy, policy.canonicalize_headers(headers), include, headers[0],
                      tags)
    if isinstance(key.private, ed25519.Ed25519PrivateKey):
        seed = key.private.private_bytes(serialization.Encoding.Raw,
                                         serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
        sig = nacl.signing.SigningKey(seed).sign(h.digest()).signature
    else:
        pem = key.private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        sig = dkim.crypto.RSASSA_PKCS1_v1_5_sign(h, dkim.crypto.parse_pem_private_key(pem))
    return bh, base64.b64encode(sig)


def relay_tags(signed: bytes) -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(signed)
    return {k: re.sub(rb"\s+", b"", v)
            for k, v in dkim.util.parse_tag_value(headers[0][1]).items()}


@settings(max_examples=150, deadline=None)
@given(messages(), st.sampled_from([RSA, ED]))
def test_signature_identical_to_dkimpy(data: bytes, key: DkimKey) -> None:
    signed = Signer(DkimKeys([key]), clock=lambda: NOW).sign(data, sender_domain="example.com")
    assert signed.endswith(data)
    if data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):   # as from DATA
        assert Signer(DkimKeys([key]), clock=lambda: NOW).sign(
            data, sender_domain="example.com", crlf=True) == signed
    tags = relay_tags(signed)
    assert tags[b"t"] == str(NOW).encode()
    assert (tags[b"bh"], tags[b"b"]) == dkimpy_recomputes(signed, key)


def test_shapes_identical_to_dkimpy() -> None:
    """The shapes the issue names, each once, with both algorithms."""
    long_subject = b"Subject: " + b" ".join([b"word"] * 60) + b"\r\n"
    folded = b"References: " + b"\r\n\t".join(b"<%d@example.com>" % i for i in range(40))
    base = b"From: Support <support@example.com>\r\nTo: c@example.net\r\n"
    for data in (base + long_subject + folded + b"\r\n\r\nbody\r\n",      # long folded headers
                 base + b"\r\n",                                            # empty body
                 base + b"\r\nlast line\r\n\r\n\r\n\r\n",                   # trailing blank lines
                 base + b"Subject: J\xc3\xb6rg\r\n\r\ncaf\xc3\xa9 \xff\xfe  \r\n"):  # 8-bit
        for key in (RSA, ED):
            signed = Signer(DkimKeys([key]), clock=lambda: NOW).sign(
                data, sender_domain="example.com")
            tags = relay_tags(signed)
            assert (tags[b"bh"], tags[b"b"]) == dkimpy_recomputes(signed, key)
