"""Property tests (hypothesis) for the parsers a hostile client talks to first.

SMTP command parsing (``relay.smtp.policy``), the DATA reader (``relay.smtp.data``), the
session limits' screens (``relay.smtp.session_limits``) and the IMAP/POP3 pre-login
machines (``relay.proxy.imap``/``pop3``): no input makes them raise anything but their
own refusal, their memory stays bounded whatever arrives, cutting the same bytes into
different chunks never changes what they decide, and what they accept comes back out
unchanged (round trip).
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.proxy.events import Close, Event, Login, Send, StartTls
from relay.proxy.imap import ImapPreAuth
from relay.proxy.pop3 import MAX_COMMAND, Pop3PreAuth
from relay.smtp.data import DataReader, Message, TooBig
from relay.smtp.policy import parse_command
from relay.smtp.session_limits import DataDeadline, JunkCounter, http_request, other_protocol
from relay.verdict import Refusal

pytestmark = pytest.mark.fast

def is_clean_name(user: str) -> bool:
    """No C0, DEL or C1 control character (checked here, not with relay's own helper)."""
    return not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in user)


# --- SMTP MAIL FROM / RCPT TO ------------------------------------------------------------

ATEXT = string.ascii_letters + string.digits + "#$&'*+-/=?^_`{|}~"
atom = st.text(ATEXT, min_size=1, max_size=10)
local = st.lists(atom, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 64)
label = st.from_regex(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,8}[A-Za-z0-9])?", fullmatch=True)
domain = st.lists(label, min_size=2, max_size=4).map(".".join)
address = st.builds(lambda lp, d: f"{lp}@{d}", local, domain)
params = st.fixed_dictionaries({}, optional={
    "SIZE": st.integers(0, 10_000).map(str), "BODY": st.sampled_from(["7BIT", "8BITMIME"]),
    "SMTPUTF8": st.none()})


@settings(max_examples=300, deadline=None)
@given(addr=address, extra=params, keyword=st.sampled_from(["FROM:", "from:", "From:"]),
       space=st.sampled_from(["", " "]))
def test_a_valid_path_comes_back_unchanged(addr: str, extra: dict[str, str | None],
                                           keyword: str, space: str) -> None:
    text = " ".join(k if v is None else f"{k}={v}" for k, v in extra.items())
    arg = f"{keyword}{space}<{addr}>" + (f" {text}" if text else "")
    parsed = parse_command(arg, "FROM:", what="sender", null_ok=True)
    assert parsed.address == addr
    assert parsed.params == extra


@settings(max_examples=500, deadline=None)
@given(arg=st.text(max_size=300), keyword=st.sampled_from(["FROM:", "TO:"]),
       utf8=st.sampled_from([None, True, False]))
def test_any_argument_is_parsed_or_refused(arg: str, keyword: str, utf8: bool | None) -> None:
    try:
        parsed = parse_command(arg, keyword, what="x", null_ok=keyword == "FROM:",
                               smtputf8=utf8)
    except Refusal as r:
        assert r.reply[:1] in "45" and r.reply.isprintable()
        return
    assert parsed.address in arg                                 # never rewritten
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in parsed.address)
    assert "%" not in parsed.address.rpartition("@")[0] or parsed.address.startswith('"')


@settings(max_examples=300, deadline=None)
@given(quoted=st.text(max_size=40), dom=domain)
def test_a_quoted_local_part_never_smuggles_a_control_character(quoted: str, dom: str) -> None:
    try:
        parsed = parse_command(f'TO:<"{quoted}"@{dom}>', "TO:", what="recipient",
                               null_ok=False, smtputf8=True)
    except Refusal:
        return
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in parsed.address)


# --- the DATA reader ---------------------------------------------------------------------

def feed_cut(reader: DataReader, stream: bytes, cuts: list[int]) -> object:
    """The event of ``stream`` fed in pieces; its leftover includes bytes never fed."""
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        event = reader.feed(stream[a:b])
        if event is not None:
            return dataclasses.replace(event, leftover=event.leftover + stream[b:])
    return None


PIECES = st.sampled_from([b"\r\n", b".", b"\r\n.\r\n", b"\n", b"\r", b"..", b"x", b"\r\n.",
                          b".\r\n", b"Subject: s\r\n"])
DATA_STREAM = st.lists(PIECES | st.binary(max_size=30), max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(stream=DATA_STREAM, cuts=st.lists(st.integers(0, 1500), max_size=8),
       max_size=st.sampled_from([16, 200, 1 << 20]))
def test_where_the_bytes_are_cut_never_changes_the_verdict(stream: bytes, cuts: list[int],
                                                           max_size: int) -> None:
    whole = DataReader(max_size).feed(stream)
    cut = feed_cut(DataReader(max_size), stream, cuts)
    assert cut == whole


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.binary(min_size=1, max_size=4096), min_size=1, max_size=40),
       max_size=st.integers(1, 5000))
def test_memory_is_bounded_by_the_size_limit(chunks: list[bytes], max_size: int) -> None:
    reader = DataReader(max_size)
    for chunk in chunks:
        event = reader.feed(chunk.replace(b"\r\n.\r\n", b"\r\n..\r\n"))
        if event is not None:
            break
        kept = sum(len(c) for c in reader._chunks)
        assert kept <= max_size + 2 + len(chunk)
    event = reader.feed(b"\r\n.\r\n") if not reader.done else None
    if isinstance(event, TooBig):
        assert reader._chunks == []


@settings(max_examples=200, deadline=None)
@given(body=st.lists(st.binary(max_size=50), max_size=20), cuts=st.lists(st.integers(0, 2000)))
def test_a_lone_cr_or_lf_in_the_body_never_becomes_a_message(body: list[bytes],
                                                           cuts: list[int]) -> None:
    text = b"\r\n".join(body) + b"\r\n"
    stuffed = b"".join(b"." + line if line.startswith(b".") else line
                       for line in text.splitlines(keepends=True))
    event = feed_cut(DataReader(1 << 20), stuffed + b".\r\n", cuts)
    bare = text.count(b"\r") != text.count(b"\r\n") or text.count(b"\n") != text.count(b"\r\n")
    if isinstance(event, Message):
        assert not bare
        assert event.body.count(b"\n") == event.body.count(b"\r\n")


# --- the screens of session_limits ---------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(first=st.binary(min_size=1, max_size=20), verb=st.text(max_size=20),
       arg=st.none() | st.text(max_size=60), limit=st.integers(1, 50),
       received=st.integers(0, 1 << 30))
def test_the_screens_are_total(first: bytes, verb: str, arg: str | None, limit: int,
                               received: int) -> None:
    what = other_protocol(first)
    assert what is None or first[:1] not in (string.ascii_letters.encode() + b"\r\n")
    assert isinstance(http_request(verb, arg), bool)
    junk = JunkCounter(limit)
    assert [junk.add() for _ in range(limit + 1)] == [False] * limit + [True]
    deadline = DataDeadline(100.0, base=10.0, min_rate=500)
    assert deadline.at(received) >= 110.0


# --- IMAP and POP3 before login --------------------------------------------------------------

IMAP_PIECES = st.sampled_from([
    b"a LOGIN ", b"b AUTHENTICATE PLAIN", b"{5}\r\n", b"{3+}\r\n", b'"', b"\\", b"\r\n",
    b"\x00", b"\x01", b"\x7f", b"\xc2\x85", b" ", b"AGFsaWNlAHB3", b"c NOOP", b"d CAPABILITY",
    b"GET / HTTP/1.1", b"\x16\x03\x01", b"agent", b"pw", b"e ID NIL",
])
POP3_PIECES = st.sampled_from([
    b"USER ", b"PASS ", b"AUTH PLAIN ", b"AUTH LOGIN", b"CAPA", b"STAT", b"\r\n", b"\n",
    b"\x00", b"\x01", b"\x7f", b"\xc2\x85", b" ", b"AGFsaWNlAHB3", b"*", b"agent", b"pw",
    b"GET / HTTP/1.1", b"\x16\x03", b"x" * 120,
])


def events_of(machine: ImapPreAuth | Pop3PreAuth, chunks: list[bytes]) -> tuple[bytes, list[Event]]:
    """What the machine sends (concatenated) and every other event, until it stops parsing."""
    sent, other = b"", []
    for chunk in chunks:
        for ev in machine.receive(chunk):
            if isinstance(ev, Send):
                sent += ev.data
            else:
                other.append(ev)
        if any(isinstance(e, Login | Close | StartTls) for e in other):
            break
    return sent, other


def same_decisions(a: list[Event], b: list[Event]) -> bool:
    def key(e: Event) -> object:
        return (type(e).__name__, e.user, e.password.reveal(), e.mechanism) \
            if isinstance(e, Login) else e
    return [key(e) for e in a] == [key(e) for e in b]


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(IMAP_PIECES | st.binary(max_size=20), max_size=30),
       tls=st.sampled_from(["none", "starttls"]))
def test_imap_split_anywhere_decides_the_same(pieces: list[bytes], tls: str) -> None:
    stream = b"".join(pieces)
    opts = {"tls_mode": tls, "max_line": 256, "allow_plaintext_auth": True}
    whole = events_of(ImapPreAuth(**opts), [stream])                # type: ignore[arg-type]
    machine = ImapPreAuth(**opts)                                    # type: ignore[arg-type]
    bytewise = events_of(machine, [stream[i:i + 1] for i in range(len(stream))])
    assert bytewise[0] == whole[0]
    assert same_decisions(bytewise[1], whole[1])
    assert len(machine._buf) <= 256 + 1
    for e in whole[1]:
        if isinstance(e, Login):
            assert is_clean_name(e.user)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(POP3_PIECES | st.binary(max_size=20), max_size=30),
       tls=st.sampled_from(["none", "starttls"]))
def test_pop3_split_anywhere_decides_the_same(pieces: list[bytes], tls: str) -> None:
    stream = b"".join(pieces)
    opts = {"tls_mode": tls, "max_line": 1024, "allow_plaintext_auth": True}
    whole = events_of(Pop3PreAuth(**opts), [stream])                 # type: ignore[arg-type]
    machine = Pop3PreAuth(**opts)                                     # type: ignore[arg-type]
    bytewise = events_of(machine, [stream[i:i + 1] for i in range(len(stream))])
    assert bytewise[0] == whole[0]
    assert same_decisions(bytewise[1], whole[1])
    assert len(machine._buf) <= 1024 + 1
    for e in whole[1]:
        if isinstance(e, Login):
            assert is_clean_name(e.user)


@settings(max_examples=300, deadline=None)
@given(user=st.text(min_size=1, max_size=30), via=st.sampled_from(["imap", "pop3", "sasl"]))
def test_a_login_never_carries_a_control_character_in_the_user_name(user: str,
                                                                      via: str) -> None:
    name = user.encode("utf-8", "surrogatepass")
    if via == "imap":
        quoted = name.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
        machine: ImapPreAuth | Pop3PreAuth = ImapPreAuth(tls_mode="none",
                                                         allow_plaintext_auth=True)
        stream = b'a LOGIN "' + quoted + b'" "pw"\r\n'
    elif via == "pop3":
        machine = Pop3PreAuth(tls_mode="none", allow_plaintext_auth=True)
        stream = b"USER " + name + b"\r\nPASS pw\r\n"
    else:
        machine = Pop3PreAuth(tls_mode="none", allow_plaintext_auth=True)
        stream = b"AUTH PLAIN " + base64.b64encode(b"\0" + name + b"\0pw") + b"\r\n"
    for e in machine.receive(stream):
        if isinstance(e, Login):
            assert is_clean_name(e.user), e.user


@settings(max_examples=100, deadline=None)
@given(arg=st.binary(min_size=MAX_COMMAND - 6, max_size=600).filter(
    lambda b: b"\n" not in b and b"\r" not in b))
def test_pop3_command_lines_never_pass_255_octets(arg: bytes) -> None:
    m = Pop3PreAuth(tls_mode="none", allow_plaintext_auth=True)
    events = m.receive(b"USER " + arg + b"\r\n")
    assert any(isinstance(e, Close) and e.reason == "line_too_long" for e in events)
