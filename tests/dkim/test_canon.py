"""relay's relaxed body canonicalisation equals dkimpy's on any body."""

from __future__ import annotations

import pytest
from dkim.canonicalization import Relaxed
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.dkim.sign import relaxed_body

pytestmark = pytest.mark.fast

pieces = st.sampled_from([b" ", b"\t", b"\r\n", b"a", b"b c", b"  ", b"\t \r\n", b"\r", b"\n",
                          b"\xc3\xa4", b"x\r\n\r\n"])


@settings(max_examples=500, deadline=None)
@given(st.lists(pieces, max_size=40))
def test_relaxed_body_matches_dkimpy(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def test_examples() -> None:
    assert relaxed_body(b"") == b""
    assert relaxed_body(b"\r\n\r\n") == b""
    assert relaxed_body(b"a  b \t\r\nc\r\n\r\n") == b"a b\r\nc\r\n"
    assert relaxed_body(b"no newline") == b"no newline\r\n"
