"""The per-character screens of the SMTP session, against their plain definitions.

``policy._check_chars`` (MAIL/RCPT arguments) and ``handler._clean`` (the client's names in
the Received: header) run once per command and message, so they are a regular expression
in C; these tests hold them to the character-by-character rules they replace.
"""

from __future__ import annotations

import random

import pytest

from relay.smtp.handler import _clean
from relay.smtp.policy import _check_chars
from relay.verdict import Refusal

pytestmark = pytest.mark.fast


def reference_fault(text: str) -> str | None:
    """The first fault of ``text`` as an SMTP argument, in order; None if clean."""
    for ch in text:
        o = ord(ch)
        if o < 0x20 or o == 0x7F:
            return f"control character 0x{o:02x}"
        if 0xDC80 <= o <= 0xDCFF:
            return "invalid UTF-8"
    return None


def reference_clean(text: str, limit: int = 255) -> str:
    return "".join(c if 0x20 < ord(c) < 0x7F and c not in "()\\" else "?"
                   for c in text[:limit]) or "unknown"


def fault(text: str) -> str | None:
    try:
        _check_chars(text, "recipient")
    except Refusal as exc:
        return str(exc.reply)
    return None


SAMPLES = [
    "", "<a@example.net>", "<a\x00b@example.net>", "<a\x1fb>", "<a\x7fb>", "<a\x80b>",
    "<ü@example.net>", "<a\udc80b>", "<a\udcffb>", "<a\udc7fb>", "<a\ud800b>",
    "<a\udcc3\x01>", "<a\x01\udcc3>", "mail.example.com", "[192.0.2.1]", "(evil)\\x",
    "a b\tc", "x" * 300, "é" * 10, "\x20\x21\x27\x28\x29\x2a\x5b\x5c\x5d\x7e\x7f",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_each_sample_is_screened_as_the_plain_rules_say(text: str) -> None:
    expected = reference_fault(text)
    got = fault(text)
    assert (got is None) == (expected is None), (text, got)
    if expected is not None:
        assert got is not None and expected in got
    assert _clean(text) == reference_clean(text)
    assert _clean(text, 5) == reference_clean(text, 5)


def test_random_text_is_screened_as_the_plain_rules_say() -> None:
    rng = random.Random(4242)
    alphabet = [chr(c) for c in range(0x00, 0x100)] + ["\udc80", "\udcff", "\ud7ff",
                                                       "\ue000", "\u2028", "\U0001f600"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        expected = reference_fault(text)
        got = fault(text)
        assert (got is None) == (expected is None), repr(text)
        if expected is not None:
            assert got is not None and expected in got, repr(text)
        assert _clean(text) == reference_clean(text), repr(text)
