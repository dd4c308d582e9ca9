"""Fuzzing the spool's record codecs: what relay writes it reads back identically; what it
finds damaged on disk raises FormatError and nothing else, without holding much memory."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.envelope import Envelope
from relay.spool.layout import (
    FormatError,
    MessageFile,
    decode_envelope,
    decode_state,
    encode_envelope,
    encode_state,
    message_header,
    parse_header_line,
)
from relay.spool.records import QueueState, RcptStatus, Recipient
from tests.fuzzing import examples

pytestmark = pytest.mark.fast

MEMORY = 8 * 1024 * 1024

# Any text a client can get into an envelope, lone surrogates included (undecodable
# bytes of a HELO name or an address arrive as surrogate escapes).
texts = st.text(st.characters(codec=None, categories=None), max_size=40)
numbers = st.floats(min_value=0, max_value=4e9, allow_nan=False)
envelopes = st.builds(
    Envelope, sender=texts, recipients=st.lists(texts, min_size=1, max_size=5).map(tuple),
    received_at=numbers, client_ip=texts, client_helo=texts, listener=texts,
    auth_user=texts, smtputf8=st.booleans(), body_8bitmime=st.booleans(), dsn_of=texts,
    trusted=st.booleans())
recipients = st.builds(Recipient, address=texts, status=st.sampled_from(list(RcptStatus)),
                       last_reply=texts, attempts=st.integers(0, 2**40))


@st.composite
def states(draw: st.DrawFn, envelope: Envelope) -> QueueState:
    rcpts = [draw(recipients) for _ in envelope.recipients]
    for r, address in zip(rcpts, envelope.recipients, strict=True):
        r.address = address
    return QueueState(recipients=rcpts, attempts=draw(st.integers(0, 2**40)),
                      next_attempt=draw(numbers), held=draw(st.booleans()),
                      last_attempt=draw(numbers), upstream=draw(texts),
                      last_error=draw(texts))


def bounded(func: object, *args: object) -> object:
    """Call ``func``; assert it raised nothing but FormatError and held little memory."""
    tracemalloc.start()
    try:
        return func(*args)  # type: ignore[operator]
    except FormatError:
        return None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < MEMORY, f"{peak / 1e6:.1f} MB"


@examples(100)
@given(env=envelopes, data=st.data())
def test_envelope_and_state_round_trip(env: Envelope, data: st.DataObject) -> None:
    raw = encode_envelope(env)
    assert decode_envelope(raw) == env
    state = data.draw(states(env))
    assert decode_state(encode_state(state), env) == state


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**400), 10**400),
              st.floats(allow_nan=True, allow_infinity=True), texts),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)


@st.composite
def damaged_records(draw: st.DrawFn, good: dict[str, object]) -> bytes:
    """A good record with fields dropped, retyped or set to extreme values, or junk."""
    record = dict(good)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*record, "recipients", "v", "extra"]))
        if draw(st.booleans()) and key in record:
            del record[key]
        else:
            record[key] = draw(json_values)
    text = json.dumps(record, allow_nan=True)
    how = draw(st.sampled_from(["json", "cut", "bytes", "deep", "huge-number"]))
    if how == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    elif how == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif how == "huge-number":
        text = text.replace("0", "9" * 500, 1) if "0" in text else "1" + "0" * 500
    raw = text.encode("utf-8", "surrogatepass")
    if how == "bytes":
        raw = draw(st.binary(max_size=200))
    return raw


GOOD_ENVELOPE = Envelope(sender="a@example.com", recipients=("b@example.net",),
                         received_at=1.7e9)


@examples(60)
@given(data=st.data())
def test_damaged_envelopes_and_states_raise_format_error_only(data: st.DataObject) -> None:
    env_record = json.loads(encode_envelope(GOOD_ENVELOPE))
    bounded(decode_envelope, data.draw(damaged_records(env_record)))
    state = QueueState(recipients=[Recipient("b@example.net")])
    state_record = json.loads(encode_state(state))
    bounded(decode_state, data.draw(damaged_records(state_record)), GOOD_ENVELOPE)


@examples(200)
@given(line=st.binary(max_size=80))
def test_header_lines(line: bytes) -> None:
    bounded(parse_header_line, line)


@examples(60)
@given(env=envelopes, body=st.binary(max_size=300), data=st.data())
def test_message_files_read_back_or_format_error(tmp_path: Path, env: Envelope, body: bytes,
                                                 data: st.DataObject) -> None:
    whole = message_header(encode_envelope(env), len(body)) + body
    damage = data.draw(st.sampled_from(["none", "cut", "flip", "append", "header"]))
    if damage == "cut":
        whole = whole[:data.draw(st.integers(0, len(whole) - 1))]
    elif damage == "flip":
        i = data.draw(st.integers(0, len(whole) - 1))
        whole = whole[:i] + bytes([whole[i] ^ data.draw(st.integers(1, 255))]) + whole[i + 1:]
    elif damage == "append":
        whole += data.draw(st.binary(min_size=1, max_size=20))
    elif damage == "header":
        whole = data.draw(st.binary(max_size=60)) + whole[whole.find(b"\n") + 1:]
    path = tmp_path / "message"
    path.write_bytes(whole)
    fd = os.open(path, os.O_RDONLY)
    try:
        mf = bounded(MessageFile, fd)
        if damage == "none":
            assert isinstance(mf, MessageFile)
            assert mf.envelope == env and mf.read_data() == body
        elif isinstance(mf, MessageFile):
            bounded(mf.read_data)
    finally:
        os.close(fd)
