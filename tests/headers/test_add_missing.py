"""add_missing: a Date/Message-ID is only ever inserted, never changed, and no byte moves."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.headers import DEFAULT_PROTECTED, add_missing, protected_lines, split
from tests.headers.test_headers import PROTECTED, ZENDESK

pytestmark = pytest.mark.fast

DATE = b"Date: Sat, 21 Nov 2026 09:00:00 +0000\r\n"
MID = b"Message-ID: <new@relay.test>\r\n"

names = st.sampled_from([b"From", b"To", b"Subject", b"Date", b"DATE", b"date ", b"Message-ID",
                         b"message-id", b"Message-Id\t", b"References", b"X-Mailer",
                         b"Auto-Submitted", b"X-Zendesk-Email-Id", b"Received"])
values = st.binary(min_size=0, max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b""))
fields = st.lists(st.tuples(names, values, st.booleans()), max_size=12)


def build(items: list[tuple[bytes, bytes, bool]], body: bytes) -> bytes:
    out = b""
    for name, value, folded in items:
        out += name + b":" + value + (b"\r\n\t" + value if folded else b"") + b"\r\n"
    return out + b"\r\n" + body


@given(fields, st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")))
def test_inserted_at_one_place_and_only_when_absent(items: list[tuple[bytes, bytes, bool]],
                                                    body: bytes) -> None:
    data = build(items, body + b"\r\n")
    at = split(data)[1]
    out = add_missing(data, at, [DATE, MID])
    added = len(out) - len(data)
    assert out[:at] + out[at + added:] == data          # every original byte, in place
    present = {n.strip().lower() for n, _, _ in items}
    expect = (b"" if b"date" in present else DATE) + (b"" if b"message-id" in present else MID)
    assert out[at:at + added] == expect
    # protected fields the message had are the same bytes, in the same order
    before = protected_lines(data, DEFAULT_PROTECTED)
    after = [f for f in protected_lines(out, DEFAULT_PROTECTED) if f != MID or f in before]
    assert after == before


def test_present_fields_are_never_changed() -> None:
    out = add_missing(ZENDESK, split(ZENDESK)[1], [DATE, MID])
    assert out is ZENDESK
    assert protected_lines(out) == PROTECTED


def test_missing_ones_go_at_the_end_of_the_header() -> None:
    message = b"From: a@example.com\r\nTo: b@example.net\r\n\r\nbody\r\n"
    out = add_missing(message, split(message)[1], [DATE, MID])
    assert out == (b"From: a@example.com\r\nTo: b@example.net\r\n" + DATE + MID +
                   b"\r\nbody\r\n")


@pytest.mark.parametrize("field", [b"Subject: x\r\n", b"Message-ID: <a@b>\r\nBcc: x\r\n",
                                   b"Date: x", b"References: <a@b>\r\n"])
def test_only_date_and_message_id_lines(field: bytes) -> None:
    with pytest.raises(ValueError):
        add_missing(b"From: a@example.com\r\n\r\n", 21, [field])


def test_only_at_the_start_of_a_header_line() -> None:
    message = b"From: a@example.com\r\n\r\nbody\r\n"
    with pytest.raises(ValueError):
        add_missing(message, 5, [DATE])
    with pytest.raises(ValueError):
        add_missing(message, len(message) - 2, [DATE])      # inside the body
