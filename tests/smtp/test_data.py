"""Table tests for the sans-IO DATA reader: end of data, smuggling, size, unstuffing."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.smtp.data import BareLineEnding, DataReader, Event, Message, TooBig
from relay.spool.layout import bare_line_ending

pytestmark = pytest.mark.fast


def feed_all(reader: DataReader, chunks: list[bytes]) -> Event | None:
    event = None
    for chunk in chunks:
        assert event is None, "bytes fed after the end of data"
        event = reader.feed(chunk)
    return event


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream whole, byte by byte, and cut in two at every position."""
    out = [[stream], [bytes([b]) for b in stream]]
    out += [[stream[:i], stream[i:]] for i in range(1, len(stream))]
    return out


# stream after the 354 reply → (event type, body or kind, leftover)
TABLE: list[tuple[bytes, type, object, bytes]] = [
    (b".\r\n", Message, b"", b""),
    (b"a\r\n.\r\n", Message, b"a\r\n", b""),
    (b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n", Message, b"Subject: x\r\n\r\nbody\r\n",
     b"QUIT\r\n"),
    # dot stuffing: first line, later lines, a line of only dots
    (b"..x\r\n.\r\n", Message, b".x\r\n", b""),
    (b"a\r\n..\r\n...\r\n.b\r\n.\r\n", Message, b"a\r\n.\r\n..\r\nb\r\n", b""),
    (b"..\r\n.\r\n", Message, b".\r\n", b""),
    # not the end: a dot line that is not alone, dots mid-line
    (b"a\r\n.x\r\nb.\r\n.\r\n", Message, b"a\r\nx\r\nb.\r\n", b""),
    # pipelined commands after the end are returned, not swallowed
    (b"m\r\n.\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n", Message, b"m\r\n",
     b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"),
    # smuggling variants: never an end, always refused after the real end
    (b"a\n.\nMAIL FROM:<x@y.z>\r\n.\r\n", BareLineEnding, "LF", b""),
    (b"a\r.\rMAIL FROM:<x@y.z>\r\n.\r\n", BareLineEnding, "CR", b""),
    (b"a\n.\r\nMAIL FROM:<x@y.z>\r\n.\r\n", BareLineEnding, "LF", b""),
    (b"a\r\n.\nMAIL FROM:<x@y.z>\r\n.\r\n", BareLineEnding, "LF", b""),
    (b"a\r\n.\rMAIL FROM:<x@y.z>\r\n.\r\nNOOP\r\n", BareLineEnding, "CR", b"NOOP\r\n"),
    (b"Subject: hi\rBcc: x@evil.example\r\n\r\nb\r\n.\r\n", BareLineEnding, "CR", b""),
    (b"Subject: hi\nBcc: x@evil.example\r\n\r\nb\r\n.\r\n", BareLineEnding, "LF", b""),
    (b"last line without crlf\n.\r\n.\r\n", BareLineEnding, "LF", b""),
    (b"\r\r\n.\r\n", BareLineEnding, "CR", b""),
    (b"\n\r\n.\r\n", BareLineEnding, "LF", b""),
    # a CRLF split by the chunking is still a pair
    (b"a\r\nb\r\n\r\n.\r\n", Message, b"a\r\nb\r\n\r\n", b""),
]


@pytest.mark.parametrize(("stream", "kind", "expected", "leftover"), TABLE)
def test_table_every_split(stream: bytes, kind: type, expected: object,
                           leftover: bytes) -> None:
    for chunks in splits(stream):
        reader = DataReader(max_size=10_000)
        # feed up to the end; whatever comes later must be in leftover
        event = None
        rest = b""
        for i, chunk in enumerate(chunks):
            event = reader.feed(chunk)
            if event is not None:
                rest = b"".join(chunks[i + 1:])
                break
        assert event is not None, chunks
        assert isinstance(event, kind), (chunks, event)
        assert event.leftover + rest == leftover, chunks
        if isinstance(event, Message):
            assert event.body == expected, chunks
        elif isinstance(event, BareLineEnding):
            assert event.kind == expected, chunks
        assert reader.done


@pytest.mark.parametrize("stream", [
    b"", b"a\r\n", b"a\r\n.", b"a\r\n.\r", b"a\n.\n", b"a\r.\r", b"a\n.\r\n", b"a\r\n.\n",
    b"x\r\n..\r\n", b"\r\n.", b".\n", b".\r",
])
def test_not_an_end(stream: bytes) -> None:
    for chunks in splits(stream) if stream else [[b""]]:
        reader = DataReader(max_size=10_000)
        assert feed_all(reader, chunks) is None
        assert not reader.done


def test_size_limit_exact_and_over() -> None:
    body = b"x" * 8 + b"\r\n"                      # 10 bytes
    ok = DataReader(max_size=10).feed(body + b".\r\n")
    assert isinstance(ok, Message) and ok.body == body and ok.size == 10
    over = DataReader(max_size=9).feed(body + b".\r\nNOOP\r\n")
    assert isinstance(over, TooBig) and over.leftover == b"NOOP\r\n"


def test_too_big_stops_buffering_and_still_finds_the_end() -> None:
    reader = DataReader(max_size=1000)
    for _ in range(100):
        assert reader.feed(b"y" * 998 + b"\r\n") is None
    assert reader._chunks == []        # nothing kept once over the limit
    event = reader.feed(b"tail\r\n.\r\nQUIT\r\n")
    assert isinstance(event, TooBig) and event.leftover == b"QUIT\r\n"
    assert event.size == 100 * 1000 + 6


def test_too_big_end_split_across_chunks() -> None:
    reader = DataReader(max_size=5)
    assert reader.feed(b"0123456789\r\n.") is None
    assert reader.feed(b"\r") is None
    event = reader.feed(b"\nRSET\r\n")
    assert isinstance(event, TooBig) and event.leftover == b"RSET\r\n"


def test_bare_cr_after_size_is_not_checked_when_too_big() -> None:
    event = DataReader(max_size=3).feed(b"ab\rcd\r\n.\r\n")
    assert isinstance(event, TooBig)


def test_feed_after_end_is_an_error() -> None:
    reader = DataReader(max_size=100)
    assert isinstance(reader.feed(b".\r\n"), Message)
    with pytest.raises(RuntimeError):
        reader.feed(b"x")


def test_large_message_in_64k_chunks() -> None:
    line = b"A" * 76 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * 1400 + b".hidden\r\n" + line
    stream = body.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    reader = DataReader(max_size=1 << 20)
    event = None
    for i in range(0, len(stream), 65536):
        event = reader.feed(stream[i:i + 65536])
    assert isinstance(event, Message) and event.body == body


def feed_cut(stream: bytes, cuts: list[int]) -> tuple[Event | None, bytes]:
    """Feed ``stream`` cut at ``cuts``: the event, and what was not fed after it."""
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    reader = DataReader(max_size=1 << 20)
    for a, b in itertools.pairwise(points):
        event = reader.feed(stream[a:b])
        if event is not None:
            return event, stream[b:]
    return None, b""


# --- property: any CRLF message, dot-stuffed and cut anywhere, comes back unchanged

_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(_line | st.sampled_from([b".", b"..", b".x", b""]), max_size=30),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
       after=st.binary(max_size=20))
def test_roundtrip_property(lines: list[bytes], cuts: list[int], after: bytes) -> None:
    body = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n"
                       for line in lines)
    stream = stuffed + b".\r\n" + after
    event, rest = feed_cut(stream, cuts)
    assert isinstance(event, Message)
    assert event.body == body
    assert event.leftover + rest == after


# --- differential: the incremental reader against the rule read off the whole stream

def _whole_stream_rule(stream: bytes) -> tuple[type, object, bytes] | None:
    """RFC 5321 4.1.1.4 and 4.5.2 applied to the whole stream at once: the first
    <CRLF>.<CRLF> (the 354 reply counts as the CRLF before a first-line dot) ends the
    data; a bare CR or LF refuses it; each line's leading dot goes."""
    s = b"\r\n" + stream
    at = s.find(b"\r\n.\r\n")
    if at < 0:
        return None
    body, leftover = s[2:at + 2], s[at + 5:]
    if (bare := bare_line_ending(body)) is not None:
        return BareLineEnding, bare, leftover
    unstuffed = (b"\r\n" + body).replace(b"\r\n.", b"\r\n")[2:]
    return Message, unstuffed, leftover


_piece = st.sampled_from([b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"..", b"\r\n.\r\n",
                          b"\r\n..", b"\r\n.a", b"xyz"])


@settings(max_examples=2000, deadline=None)
@given(pieces=st.lists(_piece, max_size=25),
       cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8))
def test_matches_the_whole_stream_rule_however_cut(pieces: list[bytes],
                                                   cuts: list[int]) -> None:
    stream = b"".join(pieces)
    event, rest = feed_cut(stream, cuts)
    expected = _whole_stream_rule(stream)
    if expected is None:
        assert event is None
        return
    kind, value, leftover = expected
    assert isinstance(event, kind)
    if isinstance(event, Message):
        assert event.body == value
    else:
        assert isinstance(event, BareLineEnding) and event.kind == value
    assert event.leftover + rest == leftover
