"""PIPELINING toward the provider (RFC 2920): MAIL, RCPT... and DATA in one write.

Each provider script runs twice, against an upstream that offers PIPELINING and one that
does not: the verdicts, the mail received and the session's reuse must be the same; only
the number of round trips differs. The reply parser underneath is table-tested.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.outbound.wire import Reply, ReplyParser, WireError
from tests.delivery.helpers import BODY, deliverer, message, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream

TWO = ("bob@example.net", "carol@example.net")


def envelope_chunks(peer: RecordingUpstream) -> list[bytes]:
    """The reads in which the upstream got a MAIL command."""
    return [data for _, data in peer.chunks if b"MAIL FROM:" in data]


@pytest.mark.parametrize("pipelining", [True, False])
async def test_mail_rcpt_and_data_go_out_in_one_write_when_offered(
        pipelining: bool, started: list[RecordingUpstream]) -> None:
    peer = await start(started, pipelining=pipelining)
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(rcpts=TWO), BODY, list(TWO))
    await d.close()
    assert all(r.ok for r in res.values())
    assert [m.rcpt_tos for m in peer.received] == [list(TWO)]
    [first] = envelope_chunks(peer)
    together = b"RCPT TO:<carol@example.net>" in first and first.endswith(b"DATA\r\n")
    assert together is pipelining, first


# script for the upstream, then (code, permanent) per recipient of TWO, and what arrives
SCRIPTS: list[tuple[str, dict[str, Any], list[tuple[int, bool]], int]] = [
    ("accepted", {}, [(250, False), (250, False)], 1),
    ("one recipient refused", {"rcpt_script": {"bob@example.net": ["550 5.1.1 no such user"]}},
     [(550, True), (250, False)], 1),
    ("one recipient over quota, 452",
     {"rcpt_script": {"carol@example.net": ["452 4.5.3 too many recipients"]}},
     [(250, False), (452, False)], 1),
    ("MAIL refused", {"script": {"MAIL": ["550 5.7.1 sender not allowed"]}},
     [(550, True), (550, True)], 0),
    ("every recipient refused", {"rcpt_script": {
        "bob@example.net": ["550 5.1.1 no"], "carol@example.net": ["550 5.1.1 no"]}},
     [(550, True), (550, True)], 0),
    ("message refused after the data", {"script": {"DATA": ["554 5.7.1 looks like spam"]}},
     [(554, True), (554, True)], 0),
    ("provider closes at RCPT (421)", {"rcpt_script": {
        "bob@example.net": ["421 4.3.2 shutting down"]}}, [(421, False), (0, False)], 0),
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
@pytest.mark.parametrize(("script", "verdicts", "arrived"),
                         [(s, v, a) for _, s, v, a in SCRIPTS],
                         ids=[name for name, _, _, _ in SCRIPTS])
async def test_verdicts_are_the_same_pipelined_or_not(
        script: dict[str, Any], verdicts: list[tuple[int, bool]], arrived: int,
        pipelining: bool, started: list[RecordingUpstream]) -> None:
    peer = await start(started, pipelining=pipelining, **script)
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(rcpts=TWO), BODY, list(TWO))
    assert [(res[r].code, res[r].permanent) for r in TWO] == verdicts
    assert len(peer.received) == arrived
    # the next message goes through, on the same session unless the provider closed it:
    # every reply of the first transaction was read, none is taken for the second's
    again = await d.deliver("up", message("Q2"), BODY, ["dave@example.net"])
    await d.close()
    assert again["dave@example.net"].ok, again
    assert peer.received[-1].rcpt_tos == ["dave@example.net"]
    assert peer.connections == (2 if verdicts[0][0] == 421 else 1)


async def test_a_354_after_every_recipient_was_refused_is_ended_with_a_lone_dot() -> None:
    """A provider that says 354 to a pipelined DATA with no recipient (RFC 2920 3.1)."""
    seen: list[bytes] = []
    replies = iter([b"220 up ESMTP", b"250-up\r\n250 PIPELINING", b"250 2.1.0 ok",
                    b"550 5.1.1 no such user", b"354 go ahead", b"250 2.0.0 empty, ok"])

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(next(replies) + b"\r\n")     # the greeting
        while line := await reader.readline():
            seen.append(line)
            writer.write(next(replies, b"221 2.0.0 bye") + b"\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        d = deliverer(upstream(port))
        res = await d.deliver("up", message(), BODY, ["bob@example.net"])
        await d.close()
    finally:
        server.close()
        await server.wait_closed()
    assert (res["bob@example.net"].code, res["bob@example.net"].permanent) == (550, True)
    assert seen[1].startswith(b"MAIL FROM:<alice@example.com>")
    assert seen[2:5] == [b"RCPT TO:<bob@example.net>\r\n", b"DATA\r\n", b".\r\n"]
    assert not any(b"Subject:" in line for line in seen)


PARSES: list[tuple[str, list[bytes], list[Reply]]] = [
    ("one reply", [b"250 2.0.0 ok\r\n"], [Reply(250, "2.0.0 ok")]),
    ("three in one read", [b"250 ok\r\n550 5.1.1 no\r\n354 go\r\n"],
     [Reply(250, "ok"), Reply(550, "5.1.1 no"), Reply(354, "go")]),
    ("split anywhere", [b"25", b"0-first\r", b"\n250 second\r\n"],
     [Reply(250, "first\nsecond")]),
    ("bare LF and no text", [b"221\n"], [Reply(221, "")]),
    ("a partial reply waits", [b"250-a\r\n"], []),
]


@pytest.mark.parametrize(("chunks", "expected"), [(c, e) for _, c, e in PARSES],
                         ids=[name for name, _, _ in PARSES])
def test_reply_parser(chunks: list[bytes], expected: list[Reply]) -> None:
    parser = ReplyParser()
    got: list[Reply] = []
    for chunk in chunks:
        got += parser.feed(chunk)
    assert got == expected


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 400 Bad Request\r\n",
    b"250-a\r\n550 b\r\n",                    # the code changed mid-reply
    b"250 " + b"x" * 3000 + b"\r\n",
    b"250 " + b"x" * 3000,                    # no end of line in sight
    b"".join(b"250-" + b"x" * 1000 + b"\r\n" for _ in range(70)),
], ids=["not SMTP", "code changed", "line too long", "unterminated", "reply too long"])
def test_reply_parser_refuses_what_is_not_smtp(data: bytes) -> None:
    with pytest.raises(WireError):
        ReplyParser().feed(data)
