"""Fuzzing header handling: split keeps every byte, rules never touch what they must not,
the guard sees exactly the changes to protected fields."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from relay.config.schema import HeaderRule
from relay.headers import (
    DEFAULT_PROTECTED,
    HeaderGuard,
    apply_rules,
    is_protected,
    protected_lines,
    remove_forged_results,
    split,
)
from tests.fuzzing import examples

pytestmark = pytest.mark.fast

NAMES = ["Subject", "From", "To", "X-Mailer", "Message-ID", "In-Reply-To", "References",
         "Auto-Submitted", "X-Auto-Response-Suppress", "X-Zendesk-Email-Id", "X-Campaign",
         "Received", "Authentication-Results", "X-Other", "subject", "MESSAGE-ID"]
FREE_NAMES = ["X-Campaign", "X-Relay-Note", "Subject", "X-Other", "Reply-To", "Organization"]
line_ends = st.sampled_from([b"\r\n", b"\n"])
values = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    """A message: fields (some folded, some broken), a blank line or not, a body."""
    sep = draw(line_ends)
    out = b""
    for _ in range(draw(st.integers(0, 10))):
        kind = draw(st.sampled_from(["field", "field", "field", "folded", "broken", "bare"]))
        name = draw(st.sampled_from(NAMES)).encode()
        if kind == "field":
            out += name + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + draw(values) + sep
        elif kind == "folded":
            out += name + b": " + draw(values) + sep + b"\t" + draw(values) + sep
        elif kind == "broken":                       # a line with no colon at all
            out += draw(values).replace(b":", b"") + sep
        else:
            out += draw(st.binary(max_size=40))     # anything, even no line end
    if draw(st.booleans()):
        out += sep + draw(st.binary(max_size=60))
    return out


rules = st.lists(st.builds(HeaderRule, action=st.sampled_from(["add", "remove", "replace"]),
                           header=st.sampled_from(FREE_NAMES),
                           value=st.text(max_size=20).map(
                               lambda t: t.replace("\r", "").replace("\n", ""))),
                 min_size=1, max_size=4)


@examples(120)
@given(data=st.binary(max_size=300) | messages())
def test_split_keeps_every_byte(data: bytes) -> None:
    fields, body_at = split(data)
    assert b"".join(f.raw for f in fields) + data[body_at:] == data
    assert all(f.raw for f in fields)


@examples(120)
@given(data=messages(), rs=rules)
def test_rules_keep_protected_fields_and_the_body(data: bytes, rs: list[HeaderRule]) -> None:
    out = apply_rules(data, rs)
    assert protected_lines(out) == protected_lines(data)
    _, body_at = split(data)
    _, out_body_at = split(out)
    assert out[out_body_at:] == data[body_at:]
    assert HeaderGuard().check(data, out)


@examples(80)
@given(data=messages(), rs=rules)
def test_remove_and_replace_are_idempotent(data: bytes, rs: list[HeaderRule]) -> None:
    """Each header named once (a list that removes then replaces one name reorders it)."""
    rs = list({r.header.lower(): r for r in rs if r.action != "add"}.values())
    once = apply_rules(data, rs)
    assert apply_rules(once, rs) == once


@examples(120)
@given(data=messages(), trace=st.lists(st.sampled_from([
    b"Received: from x by relay\r\n", b"Received-SPF: pass\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n\tb=abc\r\n",
    b"Authentication-Results: relay.test; spf=pass\r\n"]), max_size=3))
def test_the_guard_passes_prepended_trace_fields(data: bytes, trace: list[bytes]) -> None:
    if data[:1] in (b" ", b"\t") and trace:
        # A leading continuation line would fold into the prepended field: the listener
        # refuses such mail at DATA (tests/smtp/test_with_spool.py), and the guard must
        # notice when the absorbed line was a protected field.
        absorbed = protected_lines(data) != protected_lines(b"".join(trace) + data)
        assert HeaderGuard().check(data, b"".join(trace) + data) is not absorbed
        return
    assert HeaderGuard().check(data, b"".join(trace) + data)


@examples(120)
@given(data=messages(), which=st.integers(0, 50), pos=st.integers(0, 200),
       byte=st.integers(0, 255))
def test_the_guard_sees_any_change_to_a_protected_field(data: bytes, which: int, pos: int,
                                                        byte: int) -> None:
    fields, body_at = split(data)
    protected = [i for i, f in enumerate(fields) if f.name and
                 is_protected(f.name, DEFAULT_PROTECTED)]
    assume(protected)
    i = protected[which % len(protected)]
    raw = fields[i].raw
    at = len(fields[i].name) + 1 + pos % max(1, len(raw) - len(fields[i].name) - 1)
    assume(at < len(raw) and raw[at] != byte and raw[at:at + 1] not in (b"\r", b"\n"))
    changed = raw[:at] + bytes([byte]) + raw[at + 1:]
    assume(byte not in b"\r\n")
    out = b"".join(f.raw if j != i else changed for j, f in enumerate(fields)) + data[body_at:]
    assert not HeaderGuard().check(data, out)


@examples(80)
@given(data=messages())
def test_forged_results_removal_touches_nothing_else(data: bytes) -> None:
    out = remove_forged_results(data, "relay.test")
    kept = [f for f in split(data)[0] if f.name.lower() != b"authentication-results"]
    assert [f for f in split(out)[0] if f.name.lower() != b"authentication-results"] == kept
    assert protected_lines(out) == protected_lines(data)


def test_memory_stays_proportional_to_the_message() -> None:
    """A hostile header block (100,000 short fields) and a 4 MB body: a few copies at most."""
    data = b"X-A: b\r\n" * 100_000 + b"Message-ID: <m@x>\r\n\r\n" + b"x" * (4 << 20)
    rule = HeaderRule(action="replace", header="X-Campaign", value="v")
    tracemalloc.start()
    try:
        out = apply_rules(data, [rule])
        assert HeaderGuard().check(data, out)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * len(data) + (16 << 20), f"{peak / 1e6:.0f} MB for {len(data) / 1e6:.0f} MB"
