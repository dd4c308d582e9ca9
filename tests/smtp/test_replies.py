"""Replies: enhanced status codes added where aiosmtpd leaves them out; Refusal validation."""

from __future__ import annotations

import pytest

from relay.smtp.replies import with_enhanced
from relay.verdict import Refusal

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("raw", "expected"), [
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ('500 Error: command "XYZ" not recognized', '500 5.5.2 Error: command "XYZ" not recognized'),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("454 TLS not available", "454 4.7.0 TLS not available"),
    ("250 2.1.0 Ok", "250 2.1.0 Ok"),                        # already has one
    ("502 5.5.1 Too many unrecognized commands, goodbye.",
     "502 5.5.1 Too many unrecognized commands, goodbye."),
    ("250", "250 2.0.0"),
    ("999 odd", "999 odd"),                                  # unknown: left alone
])
def test_with_enhanced(raw: str, expected: str) -> None:
    assert with_enhanced(raw) == expected


def test_refusal_checks_its_reply() -> None:
    r = Refusal(550, "5.7.23", "SPF validation failed", reason="spf")
    assert r.reply == "550 5.7.23 SPF validation failed" and r.permanent
    assert Refusal.from_reply("452 4.5.3 Error: too many recipients", "x").code == 452
    with pytest.raises(ValueError):
        Refusal(250, "2.0.0", "not a refusal")
    with pytest.raises(ValueError):
        Refusal(550, "4.7.1", "class mismatch")
    with pytest.raises(ValueError):
        Refusal(550, "5.7.1", "two\r\nlines")
