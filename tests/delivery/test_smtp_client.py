"""Session set-up against Postfix's smtp-sink: greeting refusals are deferrals, never bounces."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.outbound.wire import dot_stuff
from relay.sasl import xoauth2_string
from relay.spool.layout import bare_line_ending
from tests.delivery.helpers import BODY, deliverer, message, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers import free_port, running, wait_for_port
from tests.scheduler.rig import sink_argv


@pytest.mark.fast
@pytest.mark.parametrize(("user", "token", "raw"), [
    ("cc@example.com", "ya29.a0AfH6", "user=cc@example.com\x01auth=Bearer ya29.a0AfH6\x01\x01"),
    ("ü@example.com", "t", "user=ü@example.com\x01auth=Bearer t\x01\x01"),
])
def test_xoauth2_string(user: str, token: str, raw: str) -> None:
    assert base64.b64decode(xoauth2_string(user, token)).decode() == raw


@pytest.mark.fast
@pytest.mark.parametrize(("user", "token"), [
    ("cc@example.com\x01auth=Bearer evil", "t"), ("cc@example.com\r\n", "t"), ("", "t"),
    ("cc@example.com", ""), ("cc@example.com", "tok\x01en"), ("cc@example.com", "a b"),
])
def test_xoauth2_refuses_control_characters(user: str, token: str) -> None:
    with pytest.raises(ValueError):
        xoauth2_string(user, token)


@pytest.mark.fast
@pytest.mark.parametrize(("data", "bare"), [
    (b"a\r\nb\r\n", False), (b"a\rb\r\n", True), (b"a\nb\r\n", True), (b"a\r\n\n", True),
    (b"a\r\n.\r\n", False), (b"a\r", True), (b"", False),
])
def test_bare_cr_lf(data: bytes, bare: bool) -> None:
    assert (bare_line_ending(data) is not None) is bare


@pytest.mark.fast
@pytest.mark.parametrize(("data", "wire"), [
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b".start\r\n", b"..start\r\n.\r\n"),
    (b"a\r\n.\r\n.\r\nb\r\n", b"a\r\n..\r\n..\r\nb\r\n.\r\n"),
    (b"a\r\n..two\r\n", b"a\r\n...two\r\n.\r\n"),
    (b"no final crlf", b"no final crlf\r\n.\r\n"),
    (b"", b"\r\n.\r\n"),
    (b"x.\r\n", b"x.\r\n.\r\n"),
])
def test_dot_stuff(data: bytes, wire: bytes) -> None:
    assert dot_stuff(data) == wire


@pytest.mark.parametrize(("options", "reason", "code"), [
    (("-r", "CONNECT"), "greeting_refused", 4),
    (("-f", "CONNECT"), "greeting_refused", 5),     # 5xx greeting: still a deferral
    (("-Q", "EHLO"), "ehlo_refused", 4),             # 421 and hang up
    (("-q", "EHLO"), "disconnected", 0),             # hang up without a word
    (("-q", "MAIL"), "disconnected", 0),
    (("-r", "EHLO,HELO"), "ehlo_refused", 4),
])
async def test_session_refusals_defer(tmp_path: Path, options: tuple[str, ...],
                                      reason: str, code: int) -> None:
    port = free_port()
    log = tmp_path / "sink.log"
    with running(sink_argv(port, *options), log=log) as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=log)
        d = deliverer(upstream(port))
        v = (await d.deliver("up", message(), BODY, ["b@example.net"]))["b@example.net"]
        await d.close()
    assert not v.ok and not v.permanent and v.reason == reason, v
    if code:
        assert v.reply.startswith(str(code)), v


@pytest.mark.parametrize(("options", "permanent"), [
    (("-r", "."), False), (("-f", "."), True),          # the reply to the message
    (("-r", "DATA"), False), (("-f", "DATA"), True),    # the reply to DATA itself
    (("-f", "MAIL"), True), (("-r", "RCPT"), False),
])
async def test_smtp_sink_transaction_faults(tmp_path: Path, options: tuple[str, ...],
                                            permanent: bool) -> None:
    port = free_port()
    log = tmp_path / "sink.log"
    with running(sink_argv(port, *options), log=log) as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=log)
        d = deliverer(upstream(port))
        rcpts = ["a@example.net", "b@example.net"]
        res = await d.deliver("up", message(rcpts=tuple(rcpts)), BODY, rcpts)
        await d.close()
    for v in res.values():
        assert not v.ok and v.permanent is permanent, v
        assert v.code // 100 == (5 if permanent else 4)


async def test_dots_survive_the_trip(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port))
    body = b".first\r\n\r\n.\r\n..\r\nend.\r\n.x"
    v = (await d.deliver("up", message(), body, ["b@example.net"]))["b@example.net"]
    assert v.ok
    assert peer.received[0].data == body + b"\r\n"      # only the final CRLF is added
    await d.close()


@pytest.mark.fast
@given(st.lists(st.text(alphabet=".ab \t\x00é", max_size=6), max_size=8))
def test_dot_stuff_round_trip(lines: list[str]) -> None:
    """What a receiver un-stuffs (RFC 5321 4.5.2) is exactly the message, CRLF-ended."""
    data = "".join(f"{line}\r\n" for line in lines).encode()
    wire = dot_stuff(data)
    assert wire.endswith(b"\r\n.\r\n") or wire == b"\r\n.\r\n"
    body = wire[: -len(b".\r\n")]
    got = [line[1:] if line.startswith(b".") else line for line in body.split(b"\r\n")[:-1]]
    assert all(not line.startswith(b".") or line.startswith(b"..")
               for line in body.split(b"\r\n"))
    assert b"".join(line + b"\r\n" for line in got) == (data or b"\r\n")
