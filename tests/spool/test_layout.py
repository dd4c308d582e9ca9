"""Unit tests of the spool's file format and queue ids."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.envelope import Envelope
from relay.spool.layout import (
    ID_LENGTH,
    FormatError,
    IdGenerator,
    MessageFile,
    decode_envelope,
    decode_state,
    encode_envelope,
    encode_state,
    fresh_state,
    id_time,
    is_queue_id,
    message_header,
    parse_header_line,
)
from relay.spool.records import RcptStatus

pytestmark = pytest.mark.fast

ENV = Envelope(sender="zoë@example.com", recipients=("a@example.net", "b@example.net"),
               received_at=1700000000.25, client_ip="10.0.0.5", listener="platform",
               auth_user="cc1", smtputf8=True, trusted=True)


def test_ids_are_time_ordered_unique_and_file_safe() -> None:
    gen = IdGenerator()
    ids = [gen.new() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(is_queue_id(i) and len(i) == ID_LENGTH and i.isupper() for i in ids)
    assert abs(id_time(ids[0]) - time.time()) < 60


def test_ids_of_two_generators_differ_in_the_same_microsecond() -> None:
    a, b = IdGenerator(), IdGenerator()
    ids = {a.new() for _ in range(1000)} | {b.new() for _ in range(1000)}
    assert len(ids) == 2000


@pytest.mark.parametrize("text", [
    "", "../../etc/passwd", "0" * (ID_LENGTH - 1), "0" * (ID_LENGTH + 1),
    "0" * (ID_LENGTH - 1) + "a", "0" * (ID_LENGTH - 1) + "I", "0" * (ID_LENGTH - 1) + "/",
    "0" * (ID_LENGTH - 2) + ".state"[:2], "0" * ID_LENGTH + "\n",
])
def test_bad_ids_are_refused(text: str) -> None:
    assert not is_queue_id(text)


def test_envelope_round_trip() -> None:
    assert decode_envelope(encode_envelope(ENV)) == ENV


def test_envelope_ignores_unknown_keys_and_defaults_missing_optional_ones() -> None:
    raw = b'{"sender":"","recipients":["x@y"],"received_at":5,"future_field":1}'
    env = decode_envelope(raw)
    assert env == Envelope(sender="", recipients=("x@y",), received_at=5.0)


@pytest.mark.parametrize(("raw", "why"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"recipients":["x@y"],"received_at":1}', "lacks 'sender'"),
    (b'{"sender":"a","recipients":[],"received_at":1}', "no recipients"),
    (b'{"sender":"a","recipients":"x@y","received_at":1}', "not a list"),
    (b'{"sender":"a","recipients":["x@y"],"received_at":true}', "not a number"),
    (b'{"sender":1,"recipients":["x@y"],"received_at":1}', "sender is not a str"),
    (b'{"sender":"a","recipients":["x@y"],"received_at":1,"trusted":"yes"}', "not a bool"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_bad_envelopes(raw: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        decode_envelope(raw)


@pytest.mark.parametrize(("line", "result"), [
    (b"relay-spool/1 10 20\n", (10, 20)),
    (b"relay-spool/1 0 0\n", (0, 0)),
    (b"relay-spool/2 10 20\n", "not a relay spool file"),
    (b"From: a@b\n", "not a relay spool file"),
    (b"relay-spool/1 10 x\n", "not numbers"),
    (b"relay-spool/1 -1 2\n", "not numbers"),
    (b"relay-spool/1 10 20", "incomplete"),
    (b"relay-spool/1 99999999999 1\n", "implausible"),
])
def test_header_line(line: bytes, result: tuple[int, int] | str) -> None:
    if isinstance(result, tuple):
        assert parse_header_line(line) == result
    else:
        with pytest.raises(FormatError, match=result):
            parse_header_line(line)


def _file(path: Path, content: bytes) -> int:
    path.write_bytes(content)
    return os.open(path, os.O_RDONLY)


def test_message_file_round_trip(tmp_path: Path) -> None:
    data = b"Subject: hi\r\n\r\nbody\r\n" * 1000
    fd = _file(tmp_path / "m", message_header(encode_envelope(ENV), len(data)) + data)
    try:
        mf = MessageFile(fd)
        assert mf.envelope == ENV
        assert mf.read_data() == data
    finally:
        os.close(fd)


@pytest.mark.parametrize(("mangle", "why"), [
    (lambda b: b[:-1], "truncated or overwritten"),
    (lambda b: b + b"x", "truncated or overwritten"),
    (lambda b: b[:10], "header line is truncated"),
    (lambda b: b"", "file is empty"),
    (lambda b: b"x" * 100, "not a relay spool file"),
    (lambda b: b"relay-spool/1 " + b"1" * 100, "too long"),
    (lambda b: b"GARBAGE 1 2\n" + b[b.index(b"\n") + 1:], "not a relay spool file"),
    (lambda b: b.replace(b'"sender"', b'"sendxr"'), "lacks 'sender'"),
])
def test_damaged_message_files(tmp_path: Path, mangle: Callable[[bytes], bytes],
                               why: str) -> None:
    data = b"Subject: hi\r\n\r\nbody\r\n"
    fd = _file(tmp_path / "m", mangle(message_header(encode_envelope(ENV), len(data)) + data))
    try:
        with pytest.raises(FormatError, match=why):
            MessageFile(fd)
    finally:
        os.close(fd)


def test_state_round_trip_and_checks() -> None:
    state = fresh_state(ENV)
    assert [r.status for r in state.recipients] == [RcptStatus.PENDING] * 2
    state.recipients[0].status = RcptStatus.DELIVERED
    state.recipients[1].last_reply = "451 4.7.0 try later ünïcode"
    state.recipients[1].attempts = 2
    state.attempts, state.next_attempt, state.held = 2, 1700000600.5, True
    state.upstream, state.last_error = "office365", "timeout"
    assert decode_state(encode_state(state), ENV) == state

    other = Envelope(sender="", recipients=("c@example.net",), received_at=1.0)
    with pytest.raises(FormatError, match="do not match"):
        decode_state(encode_state(state), other)


@pytest.mark.parametrize(("raw", "why"), [
    (b"{", "not valid JSON"),
    (b'{"v":99}', "no known version"),
    (b'{"v":1,"recipients":{}}', "not a list"),
    (b'{"v":1,"recipients":[{"address":"a@example.net","status":"lost","last_reply":"",'
     b'"attempts":0}],"attempts":0,"next_attempt":0,"held":false,"last_attempt":0,'
     b'"upstream":"","last_error":""}', "state field"),
    (b'{"v":1,"recipients":[],"attempts":"1","next_attempt":0,"held":false,'
     b'"last_attempt":0,"upstream":"","last_error":""}', "wrong type"),
    (b'{"v":1,"recipients":[],"attempts":1,"next_attempt":0,"held":1,'
     b'"last_attempt":0,"upstream":"","last_error":""}', "wrong type"),
    (b'{"v":1,"recipients":[],"attempts":1,"next_attempt":0,'
     b'"last_attempt":0,"upstream":"","last_error":""}', "'held' is missing"),
])
def test_bad_states(raw: bytes, why: str) -> None:
    with pytest.raises(FormatError, match=why):
        decode_state(raw, ENV)
