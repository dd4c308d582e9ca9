"""Safe points of logged-in IMAP and POP3 sessions: where ending loses the client nothing."""

from __future__ import annotations

import random

import pytest

from relay.proxy.safepoint import ImapWatch, Pop3Watch, Watch, literal_size

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("tail", "size"), [
    (b"A1 APPEND INBOX {310}\r\n", 310), (b"A1 APPEND INBOX {310+}\r\n", 310),
    (b"* 1 FETCH (BINARY[] ~{42}\r\n", 42), (b"* 1 FETCH (BODY[] {0}\r\n", 0),
    (b"{12}\n", 12), (b"* OK [ALERT] see {here}\r\n", None), (b"A1 NOOP\r\n", None),
    (b"{}\r\n", None), (b"{1" + b"9" * 30 + b"}\r\n", None),
])
def test_literal_markers(tail: bytes, size: int | None) -> None:
    assert literal_size(tail) == size


def run(w: Watch, script: list[tuple[str, bytes]]) -> list[tuple[str, int, bool]]:
    """Feed ('c'lient or 's'erver, bytes) steps; (side, bytes forwarded, at rest) each."""
    out = []
    for side, data in script:
        used = w.from_client(data) if side == "c" else w.from_server(data)
        out.append((side, used, w.rested))
    return out


def test_imap_a_quiet_session_ends_at_once_with_bye() -> None:
    w = ImapWatch()
    rests: list[bool] = []
    w.on_rest = lambda: rests.append(True)
    run(w, [("c", b"A1 SELECT INBOX\r\n"), ("s", b"* 3 EXISTS\r\nA1 OK [READ-WRITE] done\r\n")])
    w.drain()
    assert w.rested and rests == [True]
    assert w.farewell("relay: reconnect") == (b"* BYE relay: reconnect\r\n", b"RZ LOGOUT\r\n")


def test_imap_idle_acknowledged_is_a_safe_point() -> None:
    w = ImapWatch()
    run(w, [("c", b"A2 IDLE\r\n")])
    w.drain()
    assert not w.rested                          # the server has not said "+" yet
    assert run(w, [("s", b"+ idling\r\n")]) == [("s", 10, True)]
    assert w.farewell("bye")[1] == b"DONE\r\nRZ LOGOUT\r\n"


def test_imap_idle_ended_by_done_then_answered() -> None:
    w = ImapWatch()
    run(w, [("c", b"A2 IDLE\r\n"), ("s", b"+ idling\r\n* 4 EXISTS\r\n"), ("c", b"DONE\r\n")])
    w.drain()
    assert not w.rested                          # DONE sent: the IDLE's OK is awaited
    run(w, [("s", b"A2 OK IDLE terminated\r\n")])
    assert w.rested and w.farewell("x")[1] == b"RZ LOGOUT\r\n"


FETCH = [("c", b"A3 UID FETCH 7 (BODY.PEEK[])\r\n"),
         ("s", b"* 1 FETCH (UID 7 BODY[] {20}\r\n"), ("s", b"Subject: x\r\n\r\nA3 OK\r\n"),
         ("s", b")\r\n"), ("s", b"A3 OK FETCH completed\r\n")]


def test_imap_never_ends_inside_a_fetch_or_its_literal() -> None:
    w = ImapWatch()
    w.drain()
    assert w.rested                              # nothing sent yet: at rest
    w = ImapWatch()
    run(w, FETCH[:2])
    w.drain()
    steps = run(w, FETCH[2:])
    # the literal's body looks like a tagged OK: it is data, not the end
    assert [rest for _, _, rest in steps] == [False, False, True]


def test_imap_stops_forwarding_exactly_at_the_safe_point() -> None:
    w = ImapWatch()
    run(w, FETCH[:3])
    w.drain()
    tail = b")\r\nA3 OK done\r\n"
    used = w.from_server(tail + b"* 9 EXISTS\r\n")
    assert used == len(tail) and w.rested
    assert w.from_server(b"* 10 EXISTS\r\n") == 0


def test_imap_a_new_command_is_held_the_one_being_sent_goes_through() -> None:
    w = ImapWatch()
    run(w, [("c", b"A4 APPEND INBOX {11}\r\n"), ("s", b"+ Ready\r\n")])
    w.drain()
    body = b"hello world\r\n"
    assert w.from_client(body + b"A5 NOOP\r\n") == len(body)   # the APPEND ends, NOOP held
    assert w.held and not w.rested
    run(w, [("s", b"A4 OK APPEND completed\r\n")])
    assert w.rested


def test_imap_compress_makes_the_stream_unreadable_so_it_never_rests() -> None:
    w = ImapWatch()
    run(w, [("c", b"A6 COMPRESS DEFLATE\r\n"), ("s", b"A6 OK\r\n")])
    w.drain()
    assert not w.rested and "COMPRESS" in w.opaque


SESSION = (b"* 2 FETCH (FLAGS (\\Seen) BODY[HEADER] {33}\r\nFrom: a@b\r\nSubject: {9}\r\n\r\n)\r\n"
           b"* 2 FETCH (BINARY[1] ~{5}\r\n\x00\x01\r\n\x02)\r\nA7 OK done\r\n")


def test_imap_rest_comes_at_the_same_byte_however_the_stream_is_cut() -> None:
    rng = random.Random(7)
    for _ in range(300):
        w = ImapWatch()
        run(w, [("c", b"A7 FETCH 2 (BODY[HEADER] BINARY[1])\r\n")])
        w.drain()
        cuts = sorted(rng.sample(range(1, len(SESSION)), rng.randint(1, 8)))
        sent = 0
        for a, b in zip([0, *cuts], [*cuts, len(SESSION)], strict=True):
            assert not w.rested
            sent += w.from_server(SESSION[a:b])
        assert w.rested and sent == len(SESSION)


def test_pop3_never_ends_inside_a_multiline_response() -> None:
    w = Pop3Watch()
    run(w, [("c", b"RETR 1\r\n"), ("s", b"+OK 40 octets\r\nline\r\n..stuffed\r\n")])
    w.drain()
    assert not w.rested
    run(w, [("s", b".\r\n")])
    assert w.rested
    assert w.farewell("reconnect") == (b"", b"")     # nothing held, nothing to say


@pytest.mark.parametrize(("command", "answer", "multi"), [
    (b"LIST\r\n", b"+OK 2 messages\r\n", True), (b"LIST 1\r\n", b"+OK 1 120\r\n", False),
    (b"UIDL\r\n", b"+OK\r\n", True), (b"uidl 2\r\n", b"+OK 2 abc\r\n", False),
    (b"TOP 1 0\r\n", b"+OK\r\n", True), (b"CAPA\r\n", b"+OK\r\n", True),
    (b"RETR 9\r\n", b"-ERR no such message\r\n", False), (b"DELE 1\r\n", b"+OK\r\n", False),
    (b"STAT\r\n", b"+OK 2 320\r\n", False), (b"NOOP\r\n", b"+OK\r\n", False),
])
def test_pop3_which_answers_are_multiline(command: bytes, answer: bytes, multi: bool) -> None:
    w = Pop3Watch()
    run(w, [("c", command), ("s", answer)])
    w.drain()
    assert w.rested is not multi


def test_pop3_pipelined_commands_and_a_held_one() -> None:
    w = Pop3Watch()
    run(w, [("c", b"STAT\r\nLIST\r\n"), ("s", b"+OK 1 10\r\n")])
    w.drain()
    assert w.from_client(b"DELE 1\r\n") == 0 and w.held
    assert run(w, [("s", b"+OK\r\n1 10\r\n")]) == [("s", 11, False)]
    assert run(w, [("s", b".\r\n")]) == [("s", 3, True)]
    assert w.farewell("relay: reconnect")[0] == b"-ERR [SYS/TEMP] relay: reconnect\r\n"
