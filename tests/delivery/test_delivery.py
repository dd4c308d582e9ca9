"""Delivery against a real SMTP server on loopback: verdicts, reuse, caps, TLS, AUTH, timing."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import pytest

from relay.errors import BareLineEndingError
from relay.metrics import Metrics
from relay.outbound.outbox import outbox_name
from relay.spool import layout
from relay.spool.store import Spool
from tests.delivery.helpers import BODY, deliverer, message, sample, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers import free_port


async def test_delivered_byte_for_byte(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(), BODY, ["bob@example.net"])
    assert res["bob@example.net"].ok and res["bob@example.net"].code == 250
    assert [m.data for m in peer.received] == [BODY]
    assert peer.received[0].mail_from == "alice@example.com"
    raw = bytes(peer.raw[0])
    assert b"\r\n..leading dot line\r\n" in raw           # dot-stuffed on the wire
    assert b"MAIL FROM:<alice@example.com> SIZE=" in raw
    await d.close()


async def test_per_recipient_verdicts(started: list[RecordingUpstream]) -> None:
    peer = await start(started, rcpt_script={
        "gone@example.net": ["550 5.1.1 <gone@example.net>: user unknown"],
        "full@example.net": ["452 4.2.2 mailbox full"],
        "many@example.net": ["552 5.5.3 too many recipients"]})
    rcpts = ["ok@example.net", "gone@example.net", "full@example.net", "many@example.net"]
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(rcpts=tuple(rcpts)), BODY, rcpts)
    assert res["ok@example.net"].ok
    assert res["gone@example.net"].permanent
    assert res["gone@example.net"].reply == "550 5.1.1 <gone@example.net>: user unknown"
    assert not res["full@example.net"].permanent and not res["full@example.net"].ok
    assert not res["many@example.net"].permanent      # 552 at RCPT means 452 (RFC 5321)
    assert peer.received[0].rcpt_tos == ["ok@example.net"]
    await d.close()


@pytest.mark.parametrize(("command", "reply", "permanent"), [
    ("MAIL", "550 5.7.60 SendAsDenied; not allowed to send as alice", True),
    ("MAIL", "451 4.3.0 temporary failure", False),
    ("MAIL", "554 5.7.1 rejected by policy", True),
    ("DATA", "554 5.6.0 message content rejected", True),
    ("DATA", "451 4.7.500 server busy", False),
])
async def test_transaction_replies(started: list[RecordingUpstream], command: str,
                                   reply: str, permanent: bool) -> None:
    peer = await start(started, script={command: [reply]})
    rcpts = ["a@example.net", "b@example.net"]
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(rcpts=tuple(rcpts)), BODY, rcpts)
    for r in rcpts:
        assert not res[r].ok
        assert res[r].permanent is permanent
        assert res[r].reply == reply
    assert peer.received == []
    await d.close()


async def test_multiline_reply_is_kept_on_one_line(started: list[RecordingUpstream]) -> None:
    peer = await start(started, script={"DATA": ["550-5.7.1 Message rejected as spam\r\n"
                                                 "550 5.7.1 see https://example.net/why"]})
    d = deliverer(upstream(peer.port))
    v = (await d.deliver("up", message(), BODY, ["b@example.net"]))["b@example.net"]
    assert v.permanent
    assert v.reply == "550 5.7.1 Message rejected as spam 5.7.1 see https://example.net/why"
    await d.close()


async def test_421_at_rcpt_defers_the_rest(started: list[RecordingUpstream]) -> None:
    peer = await start(started, rcpt_script={"b@example.net": ["421 4.3.2 shutting down"]})
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    d = deliverer(upstream(peer.port))
    res = await d.deliver("up", message(rcpts=tuple(rcpts)), BODY, rcpts)
    assert all(not v.ok and not v.permanent for v in res.values())
    assert peer.received == []
    await d.close()


async def test_connection_reuse_and_rset(started: list[RecordingUpstream]) -> None:
    peer = await start(started, rcpt_script={"nobody@example.net": ["550 5.1.1 unknown"]})
    d = deliverer(upstream(peer.port, max_messages_per_connection=3))
    for i in range(4):
        res = await d.deliver("up", message(f"Q{i}"), BODY, ["bob@example.net"])
        assert res["bob@example.net"].ok
    assert len(peer.received) == 4
    assert peer.connections == 2                      # 3 + 1 messages
    assert bytes(peer.raw[0]).count(b"EHLO relay.test\r\n") == 1
    assert bytes(peer.raw[0]).endswith(b"QUIT\r\n")
    assert b"RSET" not in b"".join(peer.raw)          # clean transactions need no RSET
    # A transaction left unfinished (every RCPT refused) is reset before the next one.
    await d.deliver("up", message("Q5"), BODY, ["nobody@example.net"])
    await d.deliver("up", message("Q6"), BODY, ["bob@example.net"])
    assert bytes(peer.raw[1]).count(b"RSET\r\n") == 1 and peer.connections == 2
    assert len(peer.received) == 5


async def test_idle_session_is_probed_with_rset(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port), probe_idle=0.0)
    for qid in ("Q1", "Q2", "Q3"):
        assert (await d.deliver("up", message(qid), BODY, ["b@example.net"]))["b@example.net"].ok
    assert bytes(peer.raw[0]).count(b"RSET\r\n") == 2 and peer.connections == 1
    await d.close()


async def test_dead_reused_session_is_replaced_not_deferred(
        started: list[RecordingUpstream]) -> None:
    peer = await start(started, script={"MAIL": [None, "HANGUP"]})
    d = deliverer(upstream(peer.port))
    for qid in ("Q1", "Q2"):
        v = (await d.deliver("up", message(qid), BODY, ["bob@example.net"]))["bob@example.net"]
        assert v.ok, v
    assert len(peer.received) == 2 and peer.connections == 2
    await d.close()


async def test_close_quits_sessions_returned_later(started: list[RecordingUpstream]) -> None:
    peer = await start(started, delays={"DATA": 0.3})
    d = deliverer(upstream(peer.port))
    attempt = asyncio.create_task(d.deliver("up", message(), BODY, ["bob@example.net"]))
    await peer.wait_for(lambda p: p.open_now == 1)
    await d.close()                                  # a reload retires this deliverer
    assert (await attempt)["bob@example.net"].ok
    await peer.wait_for(lambda p: p.open_now == 0, timeout=5)
    assert bytes(peer.raw[0]).endswith(b"QUIT\r\n")


async def test_idle_sessions_are_closed(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port), idle_timeout=0.2)
    await d.deliver("up", message(), BODY, ["bob@example.net"])
    assert peer.open_now == 1
    await peer.wait_for(lambda p: p.open_now == 0, timeout=5)
    assert bytes(peer.raw[0]).endswith(b"QUIT\r\n")
    res = await d.deliver("up", message("Q2"), BODY, ["bob@example.net"])
    assert res["bob@example.net"].ok and peer.connections == 2
    await d.close()


async def test_concurrency_cap(started: list[RecordingUpstream]) -> None:
    peer = await start(started, delays={"DATA": 0.1})
    d = deliverer(upstream(peer.port, max_connections=2))
    results = await asyncio.gather(*(d.deliver("up", message(f"Q{i}"), BODY, ["b@example.net"])
                                     for i in range(8)))
    assert all(r["b@example.net"].ok for r in results)
    assert len(peer.received) == 8
    assert peer.max_open == 2
    assert d.concurrency("up") == 2
    await d.close()


async def test_connection_refused_is_transient() -> None:
    metrics = Metrics()
    d = deliverer(upstream(free_port()), metrics=metrics)
    res = await d.deliver("up", message(), BODY, ["bob@example.net"])
    verdict = res["bob@example.net"]
    assert not verdict.ok and not verdict.permanent and verdict.reason == "connect_refused"
    assert sample(metrics, "relay_upstream_connection_failures_total", upstream="up",
                  reason="connect_refused") == 1
    await d.close()


async def test_failed_setup_suspends_the_upstream_briefly(
        started: list[RecordingUpstream]) -> None:
    port = free_port()
    metrics = Metrics()
    d = deliverer(upstream(port), metrics=metrics, suspend_for=0.5)
    for qid, reason in (("Q1", "connect_refused"), ("Q2", "suspended"), ("Q3", "suspended")):
        v = (await d.deliver("up", message(qid), BODY, ["b@example.net"]))["b@example.net"]
        assert not v.permanent and v.reason == reason
    assert v.reply.startswith("delivery temporarily suspended: connect to 127.0.0.1")
    left = d.suspension("up", message("Q5"))            # what the scheduler waits for
    assert left is not None and 0 < left[0] <= 0.5 and left[1].startswith("connect to")
    assert sample(metrics, "relay_upstream_connection_failures_total", upstream="up",
                  reason="connect_refused") == 1          # one connection tried, not three
    peer = RecordingUpstream()
    await peer.start(port)
    started.append(peer)
    async with asyncio.timeout(5):                        # the window ends; mail flows again
        while True:
            v = (await d.deliver("up", message("Q4"), BODY, ["b@example.net"]))["b@example.net"]
            if v.ok:
                break
            assert v.reply.startswith("delivery temporarily suspended"), v
            await asyncio.sleep(0.05)                     # polling the condition, bounded
    assert len(peer.received) == 1
    assert sample(metrics, "relay_upstream_connection_failures_total", upstream="up",
                  reason="connect_refused") == 1
    await d.close()


async def test_spooled_mail_is_sent_without_scanning_it_again(
        started: list[RecordingUpstream], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The spool holds only CRLF messages (``Spool.store`` refuses a bare CR or LF), so
    delivery sends what it reads there without another scan (~175 µs per 100 KB, each
    attempt): fresh from the store's memory, or read back from disk for a retry."""
    original = layout.bare_line_ending

    def scan(data: bytes) -> str | None:
        raise AssertionError("delivery scanned a spooled message for bare CR/LF again")

    peer = await start(started)
    d = deliverer(upstream(peer.port))
    spool = Spool(tmp_path / "spool")
    try:
        qid = await spool.store(message().envelope, BODY)     # (the store's own check)
        for name, module in list(sys.modules.items()):     # then wherever a module holds it
            if name.startswith("relay.") and \
                    getattr(module, "bare_line_ending", None) is original:
                monkeypatch.setattr(module, "bare_line_ending", scan)
        fresh = await spool.read_message(qid)              # the first attempt's copy
        on_disk = await spool.read_message(qid)            # a retry's, from the file
        for data in (fresh, on_disk):
            res = await d.deliver("up", spool.load(qid), data, ["bob@example.net"])
            assert res["bob@example.net"].ok, res
    finally:
        spool.close()
        await d.close()
    assert [m.data for m in peer.received] == [BODY, BODY]
    assert b"\r\n..leading dot line\r\n" in bytes(peer.raw[0])     # dot-stuffed all the same


async def test_bare_cr_is_never_sent(started: list[RecordingUpstream], tmp_path: Path) -> None:
    """Delivery sends only what the spool holds, and the spool refuses a bare CR or LF."""
    peer = await start(started)
    spool = Spool(tmp_path / "spool")
    try:
        for bad in (b"Subject: hi\rBcc: victim@example.org\r\n\r\nbody\r\n",
                    b"Subject: hi\r\n\r\nx\n.\nMAIL FROM:<e@evil.example>\r\n"):
            with pytest.raises(BareLineEndingError):
                await spool.store(message().envelope, bad)
        assert spool.queue_ids() == []
    finally:
        spool.close()
    assert peer.connections == 0


# ---- where the time goes --------------------------------------------------------------------

async def test_stage_timing_and_slow_delivery(started: list[RecordingUpstream],
                                              caplog: pytest.LogCaptureFixture) -> None:
    peer = await start(started, delays={"DATA": 0.6})
    metrics = Metrics()
    d = deliverer(upstream(peer.port, name="office365"), metrics=metrics, slow_threshold=0.4)
    with caplog.at_level(logging.WARNING, logger="relay.delivery"):
        v = (await d.deliver("office365", message(), BODY, ["b@example.net"]))["b@example.net"]
        assert v.ok
        fast = (await d.deliver("office365", message("Q2"), BODY, ["b@example.net"]))
    assert fast["b@example.net"].ok
    assert sample(metrics, "relay_slow_deliveries_total", upstream="office365",
                  stage="data") == 2
    for stage in ("connect", "greeting", "envelope", "data"):
        count = sample(metrics, "relay_delivery_stage_seconds_count", upstream="office365",
                       stage=stage)
        assert count >= 1, stage
    # The reused session's set-up is counted once, for the first message only.
    assert sample(metrics, "relay_delivery_stage_seconds_count", upstream="office365",
                  stage="connect") == 1
    assert sample(metrics, "relay_delivery_seconds_count", upstream="office365") == 2
    assert sample(metrics, "relay_delivery_stage_seconds_sum", upstream="office365",
                  stage="data") >= 1.2
    assert "delivery to office365 took" in caplog.text
    assert "waiting for the provider's reply to DATA" in caplog.text
    await d.close()


@pytest.mark.fast
async def test_outbox_writes_files(tmp_path: Path) -> None:
    out = tmp_path / "outbox"
    up = upstream(0, name="outbox", protocol="outbox", path=out)
    d = deliverer(up)
    msg = message("QOUT1", rcpts=("a@example.net", "b@example.net"))
    res = await d.deliver("outbox", msg, BODY, ["a@example.net", "b@example.net"])
    assert all(v.ok for v in res.values())
    f = out / "QOUT1.eml"
    assert f.read_bytes() == (b"Return-Path: <alice@example.com>\r\n"
                              b"X-Original-To: a@example.net\r\nX-Original-To: b@example.net\r\n"
                              + BODY)
    # A retry for one recipient writes its own, deterministic file; no temp files remain.
    await d.deliver("outbox", msg, BODY, ["b@example.net"])
    await d.deliver("outbox", msg, BODY, ["b@example.net"])
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["QOUT1.eml", outbox_name("QOUT1", ["b@example.net"],
                                                      msg.envelope.recipients)])


async def test_mail_options_follow_the_envelope(started: list[RecordingUpstream]) -> None:
    peer = await start(started)
    d = deliverer(upstream(peer.port))
    msg = message(sender="ünï@example.com", smtputf8=True, body_8bitmime=True)
    v = (await d.deliver("up", msg, BODY, ["bob@example.net"]))["bob@example.net"]
    assert v.ok, v
    assert peer.mail_options[0][1:] == ["BODY=8BITMIME", "SMTPUTF8"]
    assert peer.mail_options[0][0] == f"SIZE={len(BODY)}"
    assert "MAIL FROM:<ünï@example.com>".encode() in bytes(peer.raw[0])
    await d.close()


async def test_message_over_the_providers_size_bounces_without_sending(
        started: list[RecordingUpstream]) -> None:
    peer = await start(started, size_limit=100)
    d = deliverer(upstream(peer.port))
    v = (await d.deliver("up", message(), BODY + b"x" * 100 + b"\r\n",
                         ["bob@example.net"]))["bob@example.net"]
    assert v.permanent and v.reply.startswith("552 5.3.4") and "100" in v.reply
    assert b"MAIL" not in bytes(peer.raw[0])
    await d.close()
