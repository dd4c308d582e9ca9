"""relay's bytes-only canonicalisation (relay.dkim.canon) equals dkimpy's on any input."""

from __future__ import annotations

import base64
import hashlib

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dkim import canon
from relay.dkim.sign import relaxed_body

pytestmark = pytest.mark.fast

pieces = st.sampled_from([b" ", b"\t", b"\r\n", b"a", b"b c", b"  ", b"\t \r\n", b"\r", b"\n",
                          b"\xc3\xa4", b"x\r\n\r\n", b"\r\r\n", b"\n\n", b"\n\r\n", b" \r",
                          b"\xff"])
# messages: header-ish lines, continuation lines, empty lines, any line ending
lines = st.sampled_from([b"From: a@example.com", b"Subject:  two  spaces ", b"\tfolded\t x",
                         b" folded", b"X-8bit: \xc3\xa4\xff", b"", b"body  line \t", b"To:",
                         b"From x", b"Date: Sun,  6 Dec 2026"])
endings = st.sampled_from([b"\r\n", b"\n", b"\r\r\n"])


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(st.tuples(lines, endings), max_size=14))
    tail = draw(st.sampled_from([b"", b"no final line break", b"\r"]))
    return b"".join(text + end for text, end in parts) + tail


@settings(max_examples=1000, deadline=None)
@given(st.lists(pieces, max_size=40))
def test_bodies_match_dkimpy(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert canon.relaxed_body(body) == Relaxed.canonicalize_body(body)
    assert canon.simple_body(body) == Simple.canonicalize_body(body)
    assert canon.body_hash(body) == base64.b64encode(
        hashlib.sha256(Relaxed.canonicalize_body(body)).digest())
    assert canon.body_hash(body, relaxed=False) == base64.b64encode(
        hashlib.sha256(Simple.canonicalize_body(body)).digest())


@settings(max_examples=1000, deadline=None)
@given(messages())
def test_split_matches_rfc822_parse(data: bytes) -> None:
    try:
        headers, body = dkim.rfc822_parse(data)
    except (dkim.MessageFormatError, IndexError):     # dkimpy refuses it: nothing to match
        return
    head, fast_body = canon.split(data)
    assert fast_body == body
    assert dkim.rfc822_parse(head) == (headers, b"")


@settings(max_examples=500, deadline=None)
@given(messages(), st.lists(st.sampled_from([b"from", b"subject", b"to", b"date", b"x-8bit"]),
                            max_size=8))
def test_headers_match_dkimpy(data: bytes, include: list[bytes]) -> None:
    try:
        headers, _ = dkim.rfc822_parse(data)
    except (dkim.MessageFormatError, IndexError):
        return
    selected = dkim.select_headers(headers, include)
    assert canon.select_headers(headers, include) == selected
    assert canon.relaxed_headers(selected) == b"".join(
        n + b":" + v for n, v in Relaxed.canonicalize_headers(selected))
    assert canon.simple_headers(selected) == b"".join(n + b":" + v for n, v in selected)


@settings(max_examples=300, deadline=None)
@given(messages(), st.booleans())
def test_header_digest_matches_dkimpy(data: bytes, relaxed: bool) -> None:
    """The digest dkimpy's verifier computes over the fields and the b=-less signature."""
    try:
        headers, _ = dkim.rfc822_parse(data)
    except (dkim.MessageFormatError, IndexError):
        return
    policy = Relaxed if relaxed else Simple
    include = [b"from", b"subject", b"date", b"x-8bit", b"from"]
    sig = [b"DKIM-Signature", b" v=1; a=rsa-sha256;  d=example.com;\r\n\th=from:subject; b=\r\n"]
    want = hashlib.sha256()
    dkim.hash_headers(want, policy, policy.canonicalize_headers(headers), include, sig, {})
    picked = canon.select_headers(headers, include)
    signed = canon.relaxed_headers(picked) if relaxed else canon.simple_headers(picked)
    assert canon.header_digest(signed, sig[0], sig[1], relaxed=relaxed) == want.digest()


def test_examples() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"a  b \t\r\nc\r\n\r\n") == b"a b\r\nc\r\n"
    assert relaxed_body(b"no newline") == b"no newline\r\n"
    assert canon.simple_body(b"") == b"\r\n"
    assert canon.simple_body(b"a \r\n\r\n\r\n") == b"a \r\n"
    assert canon.relaxed_body(b"a" + b" " * 1000 + b"b" + b"\t" * 999 + b"\r\n") == b"a b\r\n"
    assert canon.split(b"A: b\r\n\r\nx\ny\r\n") == (b"A: b\r\n", b"x\r\ny\r\n")
    assert canon.split(b"A: b\r\n") == (b"A: b\r\n", b"")
    assert canon.split(b"\r\nbody") == (b"", b"body")
    # an LF-only empty line right before a CRLF one ends the header
    assert canon.split(b"A: b\n\n\r\nx") == (b"A: b\n", b"\r\nx") == (
        b"A: b\n", dkim.rfc822_parse(b"A: b\n\n\r\nx")[1])


def test_many_trailing_blank_lines() -> None:
    body = b"text\r\n" + b"\r\n" * 2_000_000           # 4 MB of empty lines
    assert canon.relaxed_body(body) == b"text\r\n"
    assert canon.simple_body(body) == b"text\r\n"
