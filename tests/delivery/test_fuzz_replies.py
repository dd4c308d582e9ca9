"""Fuzzing the upstream's replies as relay's SMTP client reads them (aiosmtplib + relay).

Whatever a provider (or something posing as one) answers, at any point of a session, a
delivery attempt ends with a classified verdict for every recipient: delivered only on a
2xx to the data, permanent only on a 5xx, otherwise transient. Never an unclassified
error (the courier's last-resort "internal" verdict, logged with a traceback).
"""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.outbound.attempt import Deliverer
from relay.outbound.courier import RcptResult
from tests.delivery.helpers import BODY, message, upstream
from tests.fuzzing import examples

STEPS = ("greeting", "EHLO", "MAIL", "RCPT", "RCPT", "DATA", "dot")
RCPTS = ["a@example.net", "b@example.net"]

good = {"greeting": b"220 mx.test ESMTP\r\n",
        "EHLO": b"250-mx.test\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n",
        "MAIL": b"250 2.1.0 ok\r\n", "RCPT": b"250 2.1.5 ok\r\n", "DATA": b"354 go on\r\n",
        "dot": b"250 2.0.0 queued\r\n"}
codes = st.sampled_from([b"220", b"250", b"251", b"354", b"421", b"450", b"451", b"452",
                         b"500", b"550", b"552", b"554", b"999", b"000", b"2", b"25x",
                         b"-1", b"", b"   ", b"\xff\xfe"])
texts = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


@st.composite
def replies(draw: st.DrawFn, step: str) -> bytes | None:
    """One reply for ``step``: the normal one, a mangled one, or None (hang up)."""
    kind = draw(st.sampled_from(["good", "good", "code", "multi", "bytes", "long", "lf",
                                 "eof", "mixed"]))
    if kind == "good":
        return good[step]
    if kind == "eof":
        return None
    if kind == "code":
        return draw(codes) + draw(st.sampled_from([b" ", b"-", b"", b"\t"])) + \
            draw(texts) + b"\r\n" + (draw(codes) + b" end\r\n" if draw(st.booleans()) else b"")
    if kind == "multi":
        n = draw(st.integers(1, 5))
        code = draw(codes)
        return b"".join(code + b"-" + draw(texts) + b"\r\n" for _ in range(n)) + \
            code + b" " + draw(texts) + b"\r\n"
    if kind == "long":
        return b"250 " + b"x" * draw(st.sampled_from([1000, 9000, 40000])) + b"\r\n"
    if kind == "lf":
        return good[step].replace(b"\r\n", b"\n")
    if kind == "mixed":                           # continuation lines with another code
        return b"250-first\r\n" + draw(codes) + b" second\r\n"
    return draw(st.binary(min_size=1, max_size=60)) + b"\r\n"


async def serve(sock: socket.socket, script: dict[str, bytes | None]) -> None:
    """Answer each step of the session with the scripted reply, in step with the client."""
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        for step in STEPS:
            if step not in ("greeting", "dot"):
                await reader.readuntil(b"\r\n")
            if step == "dot":
                await reader.readuntil(b"\r\n.\r\n")
            reply = script.get(step)
            if reply is None:
                return
            writer.write(reply)
            await writer.drain()
        while await reader.read(4096):              # RSET, QUIT...: answer 250, then EOF
            writer.write(b"250 ok\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return
    finally:
        writer.close()


class PairTransport:
    """A transport whose "connection" is one end of a socketpair the test serves."""

    name = "pair"

    def __init__(self, script: dict[str, bytes | None]) -> None:
        self.script = script
        self.tasks: list[asyncio.Task[None]] = []

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        ours, theirs = socket.socketpair()
        self.tasks.append(asyncio.get_running_loop().create_task(serve(theirs, self.script)))
        return ours

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def attempt(script: dict[str, bytes | None]) -> dict[str, RcptResult]:
    transport = PairTransport(script)
    up = upstream(1, command_timeout=0.2, data_timeout=0.2, connect_timeout=0.2)
    d = Deliverer(upstreams=[up], transport_for=lambda _u: transport, hostname="relay.test",
                  suspend_for=0.0)
    try:
        return await d.deliver("up", message(rcpts=tuple(RCPTS)), BODY, list(RCPTS))
    finally:
        await d.close()
        await transport.close()


@examples(80)
@given(data=st.data())
def test_any_reply_gives_every_recipient_a_classified_verdict(
        data: st.DataObject, caplog: pytest.LogCaptureFixture) -> None:
    script = {step: data.draw(replies(step), label=step) for step in dict.fromkeys(STEPS)}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="relay.delivery"):
        results = asyncio.run(attempt(script))
    assert sorted(results) == RCPTS
    for rcpt, res in results.items():
        assert res.reason != "internal", (rcpt, res)
        assert res.reply.isprintable(), res          # fit for logs, the spool, a DSN
        if res.ok:
            assert script["dot"] is not None and script["dot"][:1] == b"2", (script, res)
        if res.permanent:
            assert res.code >= 500, res
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in
                                                           caplog.records]
    assert all(r.getMessage().isprintable() for r in caplog.records)


@pytest.mark.parametrize("reply", [b"250 2.0.0 ok\r\n", b"220 hello\r\n", b"334 go\r\n"])
def test_a_positive_answer_to_data_is_not_a_delivery(reply: bytes) -> None:
    """Found by the fuzz test: DATA answered 2xx (not 354) counted as delivered, unsent."""
    results = asyncio.run(attempt({**good, "DATA": reply}))
    assert all(not r.ok and not r.permanent and r.reason == "protocol"
               for r in results.values()), results
    assert "instead of 354" in results[RCPTS[0]].reply
