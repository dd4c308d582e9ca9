"""The guard's fast path (only a prefix added) agrees with the full comparison."""

from __future__ import annotations

import pytest

from relay.headers import HeaderGuard, verify_unchanged

pytestmark = pytest.mark.fast

RECEIVED = (b"Received: from x\r\n\tby relay\r\nX-Mailer: Zendesk Mailer\r\n"
            b"Auto-Submitted: auto-generated\r\nSubject: hi\r\n\r\nbody\r\n")


@pytest.mark.parametrize("outgoing, fast, ok", [
    (RECEIVED, True, True),
    (b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n" + RECEIVED, True, True),
    (b"Received-SPF: pass\r\nAuthentication-Results: x; spf=pass\r\n" + RECEIVED, True, True),
    # a protected field prepended: not the fast path, and a real violation
    (b"X-Mailer: other\r\n" + RECEIVED, False, False),
    (b"x-zendesk-email-id: 1\r\n" + RECEIVED, False, False),
    # a protected field altered inside: not the fast path, caught by the full comparison
    (RECEIVED.replace(b"Zendesk Mailer", b"Zendesk  Mailer"), False, False),
    # an unprotected field altered inside: not the fast path, but no violation
    (RECEIVED.replace(b"Subject: hi", b"Subject: ho"), False, True),
    # a prefix that does not end a line would glue onto the first received field
    (b"X-Foo: a" + RECEIVED, False, True),
])
def test_fast_path_and_verdict(outgoing: bytes, fast: bool, ok: bool) -> None:
    guard = HeaderGuard()
    assert guard.unchanged_by_prefix(RECEIVED, outgoing) is fast
    assert guard.check(RECEIVED, outgoing) is ok
    assert verify_unchanged(RECEIVED, outgoing) is ok


def test_continuation_at_the_start_of_received_is_never_fast() -> None:
    received = b"\tfolded\r\nX-Mailer: a\r\n\r\n"
    assert not HeaderGuard().unchanged_by_prefix(received, b"X-A: b\r\n" + received)
