"""The scheduler end to end: real spool, real SMTP peers (recording upstream and smtp-sink)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config.schema import ProfileConfig, RetryConfig, RouteConfig
from relay.outbound.attempt import Deliverer
from relay.outbound.outcomes import backoff
from relay.spool.records import RcptStatus
from tests.delivery.helpers import BODY, deliverer, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers import free_port, running, wait_for_port
from tests.scheduler.rig import FAST, Rig, sink_argv, until


async def peer(peers: list[RecordingUpstream], port: int = 0, **kw: object) -> RecordingUpstream:
    p = RecordingUpstream(**kw)  # type: ignore[arg-type]
    await p.start(port)
    peers.append(p)
    return p


async def rig(rigs: list[Rig], tmp_path: Path, *ups: object, **kw: object) -> Rig:
    r = Rig(tmp_path, *ups, **kw)  # type: ignore[arg-type]
    rigs.append(r)
    await r.start()
    return r


def dsn_parts(data: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    out: dict[str, str] = {}
    for part in msg.get_payload():
        ctype = part.get_content_type()
        if ctype == "message/delivery-status":
            out[ctype] = "\n".join(str(block) for block in part.get_payload())
        else:
            out[ctype] = part.get_payload(decode=False)
    return out


@pytest.mark.fast
async def test_backoff_doubles_to_max_with_jitter() -> None:
    retry = RetryConfig(first=60, max=1800, jitter=0.2)
    assert [backoff(retry, n, lambda: 0.5) for n in (1, 2, 3, 5, 6, 40)] == [
        60, 120, 240, 960, 1800, 1800]
    assert backoff(retry, 1, lambda: 0.0) == pytest.approx(48)
    assert backoff(retry, 1, lambda: 1.0) == pytest.approx(72)


@pytest.fixture
def sink_dump() -> Iterator[Path]:
    """A dump folder smtp-sink can write as nobody (pytest's tmp_path is root-only)."""
    dump = Path(tempfile.mkdtemp(prefix="relay-sink-"))
    dump.chmod(0o777)
    yield dump
    shutil.rmtree(dump, ignore_errors=True)


def dumped(dump: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(dump.iterdir()))


async def test_new_message_delivered_through_smtp_sink(rigs: list[Rig], tmp_path: Path,
                                                       sink_dump: Path) -> None:
    port, dump = free_port(), sink_dump
    argv = sink_argv(port, "-c", "-d", f"{dump}/%M.")
    with running(argv, log=tmp_path / "sink.log") as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=tmp_path / "sink.log")
        # With an hour of backoff, being delivered at all means: on the immediate attempt.
        r = await rig(rigs, tmp_path, upstream(port), retry=RetryConfig(first=3600, max=3600))
        qid = await r.send(BODY)
        await r.drained()
        await until(lambda: dumped(dump))
    assert b"Subject: hello" in dumped(dump) and b"bob@example.net" in dumped(dump)
    [line] = r.lines("delivered")
    assert line.startswith(f"{qid}: delivered to=<bob@example.net> upstream=up delay=")
    assert 'reply="250 2.0.0 Ok' in line


async def test_4xx_then_2xx_is_delivered_once(rigs: list[Rig], peers: list[RecordingUpstream],
                                              tmp_path: Path) -> None:
    p = await peer(peers, script={"DATA": ["451 4.3.0 try again later"]})
    r = await rig(rigs, tmp_path, upstream(p.port))
    qid = await r.send(BODY)
    await r.drained()
    assert len(p.received) == 1 and p.received[0].data == BODY
    assert [line.split()[1] for line in r.log] == ["deferred", "delivered"]
    assert r.lines("deferred")[0].startswith(f"{qid}: deferred to=<bob@example.net>")
    assert 'reply="451 4.3.0 try again later"' in r.lines("deferred")[0]


async def test_5xx_bounces_to_sender_and_the_bounce_is_delivered(
        rigs: list[Rig], peers: list[RecordingUpstream], tmp_path: Path) -> None:
    reply = "550 5.1.1 <gone@example.net>: Recipient address rejected: User unknown"
    p = await peer(peers, rcpt_script={"gone@example.net": [reply]})
    r = await rig(rigs, tmp_path, upstream(p.port))
    qid = await r.send(BODY, rcpts=("ok@example.net", "gone@example.net"))
    await until(lambda: len(p.received) == 2)
    await r.drained()
    original, dsn = p.received
    assert original.rcpt_tos == ["ok@example.net"]
    assert dsn.mail_from == "<>" and dsn.rcpt_tos == ["alice@example.com"]  # aiosmtpd's null
    assert b"MAIL FROM:<> SIZE=" in b"".join(p.raw)
    parts = dsn_parts(dsn.data)
    assert "Final-Recipient: rfc822; gone@example.net" in parts["message/delivery-status"]
    assert "Status: 5.1.1" in parts["message/delivery-status"]
    assert f"Diagnostic-Code: smtp; {reply}" in parts["message/delivery-status"]
    assert "Remote-MTA: dns; 127.0.0.1" in parts["message/delivery-status"]
    assert "Subject: hello" in parts["text/rfc822-headers"]
    assert "Hi Bob" not in dsn.data.decode()              # headers only, never the body
    assert reply in parts["text/plain"]
    [bounced] = r.lines("bounced")
    assert bounced.startswith(f"{qid}: bounced to=<gone@example.net> upstream=up status=5.1.1")
    assert b"Auto-Submitted: auto-replied" in dsn.data


async def test_a_bounce_is_never_bounced(rigs: list[Rig], tmp_path: Path) -> None:
    """Against smtp-sink refusing every RCPT: the DSN fails too, and is dropped."""
    port = free_port()
    argv = sink_argv(port, "-f", "RCPT")
    with running(argv, log=tmp_path / "sink.log") as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=tmp_path / "sink.log")
        r = await rig(rigs, tmp_path, upstream(port))
        qid = await r.send(BODY)
        await until(lambda: len(r.lines("bounced")) == 2)
        await r.drained()
    first, second = r.lines("bounced")
    assert first.startswith(f"{qid}: bounced to=<bob@example.net>")
    dsn_id = first.split("dsn=")[1]
    assert second.startswith(f"{dsn_id}: bounced to=<alice@example.com>")
    assert 'dsn="none (bounce of a bounce)"' in second
    assert r.spool.queue_ids() == []


async def test_lifetime_exceeded_bounces(rigs: list[Rig], peers: list[RecordingUpstream],
                                         tmp_path: Path) -> None:
    p = await peer(peers, rcpt_script={"bob@example.net": ["451 4.4.3 remote busy"] * 200})
    retry = RetryConfig(first=0.05, max=0.1, jitter=0.0, lifetime=0.4)
    r = await rig(rigs, tmp_path, upstream(p.port), retry=retry)
    qid = await r.send(BODY)
    await until(lambda: len(p.received) == 1)
    await r.drained()
    [bounced] = r.lines("bounced")
    assert bounced.startswith(f"{qid}: bounced to=<bob@example.net> upstream=up status=4.4.3")
    assert "gave up after" in bounced and "451 4.4.3 remote busy" in bounced
    assert len(r.lines("deferred")) >= 2
    parts = dsn_parts(p.received[0].data)
    assert "Action: failed" in parts["message/delivery-status"]
    assert "queue lifetime" in parts["text/plain"]


async def test_upstream_down_then_up(rigs: list[Rig], peers: list[RecordingUpstream],
                                     tmp_path: Path) -> None:
    port = free_port()
    r = await rig(rigs, tmp_path, upstream(port),
                  retry=RetryConfig(first=0.2, max=0.2, jitter=0.0))
    qid = await r.send(BODY)
    await until(lambda: r.spool.load(qid).state.attempts >= 1)   # deferred, state saved
    assert "connect to 127.0.0.1" in r.lines("deferred")[0]
    state = r.spool.load(qid).state
    assert state.recipients[0].status is RcptStatus.PENDING and state.attempts >= 1
    assert "failed" in state.recipients[0].last_reply
    p = await peer(peers, port)
    await r.drained()
    assert len(p.received) == 1
    assert r.lines("bounced") == []


async def test_concurrency_cap_per_upstream(rigs: list[Rig], peers: list[RecordingUpstream],
                                            tmp_path: Path) -> None:
    p = await peer(peers, delays={"DATA": 0.05})
    r = await rig(rigs, tmp_path, upstream(p.port, max_connections=2))
    for i in range(10):
        await r.send(BODY, rcpts=(f"r{i}@example.net",))
    await r.drained()
    assert len(p.received) == 10
    assert p.max_open == 2
    assert p.connections == 2                               # and the sessions were reused


async def test_held_messages_are_skipped_after_restart(rigs: list[Rig],
                                                       peers: list[RecordingUpstream],
                                                       tmp_path: Path) -> None:
    p = await peer(peers)
    first = Rig(tmp_path, upstream(p.port))
    first.spool.recover()
    held_id = await first.send(BODY, rcpts=("held@example.net",))
    msg = first.spool.load(held_id)
    msg.state.held = True
    await first.spool.save_state(msg)
    await first.send(BODY, rcpts=("free@example.net",))
    first.spool.close()
    r = await rig(rigs, tmp_path, upstream(p.port))         # recovers both
    await until(lambda: len(p.received) == 1)
    await until(lambda: len(r.spool.queue_ids()) == 1)
    assert r.spool.queue_ids() == [held_id]
    assert p.received[0].rcpt_tos == ["free@example.net"]
    assert held_id not in r.scheduler.scheduled()
    # release: the queue tool clears the flag and asks for a reschedule
    msg = r.spool.load(held_id)
    msg.state.held = False
    msg.state.next_attempt = 0.0
    await r.spool.save_state(msg)
    r.scheduler.reschedule(held_id)
    await r.drained()
    assert len(p.received) == 2


async def test_stop_waits_for_attempts_in_flight(rigs: list[Rig],
                                                 peers: list[RecordingUpstream],
                                                 tmp_path: Path) -> None:
    p = await peer(peers, delays={"DATA": 0.5})
    r = Rig(tmp_path, upstream(p.port))
    await r.start()
    qid = await r.send(BODY)
    await until(lambda: r.scheduler.in_flight(qid))
    await r.scheduler.stop(grace=10.0)
    assert not r.scheduler.in_flight(qid)
    assert len(p.received) == 1 and r.spool.queue_ids() == []
    await r.deliverer.close()
    r.spool.close()


async def test_reconfigure_moves_new_attempts(rigs: list[Rig], peers: list[RecordingUpstream],
                                              tmp_path: Path) -> None:
    old, new = await peer(peers), await peer(peers)
    r = await rig(rigs, tmp_path, upstream(old.port))
    await r.send(BODY)
    await r.drained()
    fresh: Deliverer = deliverer(upstream(new.port), metrics=r.metrics)
    r.scheduler.reconfigure(router=r.router, deliverer=fresh, retry=FAST)
    await r.deliverer.close()
    r.deliverer = fresh
    await r.send(BODY)
    await r.drained()
    assert len(old.received) == 1 and len(new.received) == 1


async def test_slow_delivery_against_smtp_sink(rigs: list[Rig], tmp_path: Path) -> None:
    port = free_port()
    argv = sink_argv(port, "-W", ".:1")      # slow after the message: the data stage
    with running(argv, log=tmp_path / "sink.log") as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=tmp_path / "sink.log")
        r = await rig(rigs, tmp_path, upstream(port, name="office365"),
                      default="office365", slow_threshold=0.5)
        await r.send(BODY)
        await r.drained()
    value = r.metrics.registry.get_sample_value(
        "relay_slow_deliveries_total", {"upstream": "office365", "stage": "data"})
    assert value == 1


@pytest.mark.fast
async def test_outbox_upstream_end_to_end(rigs: list[Rig], tmp_path: Path) -> None:
    out = tmp_path / "outbox"
    ob = replace(upstream(0, name="outbox", protocol="outbox"), path=out)
    r = await rig(rigs, tmp_path, ob, default="outbox")
    qid = await r.send(BODY)
    await r.drained()
    assert (out / f"{qid}.eml").read_bytes().endswith(BODY)
    assert "upstream=outbox" in r.lines("delivered")[0]


async def test_unrouted_recipients_stay_queued(rigs: list[Rig], peers: list[RecordingUpstream],
                                               tmp_path: Path) -> None:
    p = await peer(peers)
    r = await rig(rigs, tmp_path, upstream(p.port), default=None)
    qid = await r.send(BODY)
    await until(lambda: r.lines("deferred"))
    assert "no route" in r.lines("deferred")[0]
    assert r.spool.queue_ids() == [qid] and p.connections == 0


async def test_retry_sends_only_the_pending_recipients(rigs: list[Rig],
                                                       peers: list[RecordingUpstream],
                                                       tmp_path: Path) -> None:
    p = await peer(peers, rcpt_script={"later@example.net": ["450 4.2.1 mailbox busy"]})
    r = await rig(rigs, tmp_path, upstream(p.port))
    qid = await r.send(BODY, rcpts=("now@example.net", "later@example.net"))
    await r.drained()
    assert [m.rcpt_tos for m in p.received] == [["now@example.net"], ["later@example.net"]]
    assert [line.split()[1:3] for line in r.log] == [
        ["delivered", "to=<now@example.net>"], ["deferred", "to=<later@example.net>"],
        ["delivered", "to=<later@example.net>"]]
    assert all(line.startswith(qid) for line in r.log)


async def test_recipients_split_across_upstreams(rigs: list[Rig],
                                                 peers: list[RecordingUpstream],
                                                 tmp_path: Path) -> None:
    a, b = await peer(peers), await peer(peers, rcpt_script={"x@partner.org": ["451 4.3.0 no"]})
    routes = (RouteConfig(upstream="partner", recipient_domain="partner.org"),)
    r = await rig(rigs, tmp_path, upstream(a.port), upstream(b.port, name="partner"),
                  routes=routes, retry=RetryConfig(first=30, max=30, jitter=0.0))
    sent = time.time()
    qid = await r.send(BODY, rcpts=("bob@example.net", "x@partner.org"))
    # the state file is written first, then the message is scheduled again: wait for both
    await until(lambda: r.spool.load(qid).state.attempts == 1 and qid in r.scheduler.scheduled())
    state = r.spool.load(qid).state
    recorded = time.time()
    assert [(x.address, x.status) for x in state.recipients] == [
        ("bob@example.net", RcptStatus.DELIVERED), ("x@partner.org", RcptStatus.PENDING)]
    assert state.upstream == "partner,up" and state.last_error == "451 4.3.0 no"
    # backoff (30 s from the attempt), not a busy loop, however slow this machine is
    assert sent + 30 <= state.next_attempt <= recorded + 30
    assert r.scheduler.scheduled()[qid] == pytest.approx(state.next_attempt, abs=0.5)
    assert [m.rcpt_tos for m in a.received] == [["bob@example.net"]]
    assert b.received == []


async def test_certificate_failure_defers_never_bounces(rigs: list[Rig],
                                                        peers: list[RecordingUpstream],
                                                        tmp_path: Path) -> None:
    ca, other = trustme.CA(), trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("upstream.test").configure_cert(ctx)
    p = await peer(peers, starttls=ctx)
    wrong = tmp_path / "wrong-ca.pem"
    other.cert_pem.write_to_path(str(wrong))
    r = await rig(rigs, tmp_path, upstream(p.port, tls="starttls", ca_file=wrong,
                                           tls_server_name="upstream.test"),
                  retry=RetryConfig(first=60, max=60, jitter=0.0, lifetime=3600))
    qid = await r.send(BODY)
    await until(lambda: r.spool.load(qid).state.attempts == 1)
    [deferred] = r.lines("deferred")
    assert "TLS certificate of up" in deferred and "upstream.test" in deferred
    assert r.lines("bounced") == [] and p.received == []
    assert r.metrics.registry.get_sample_value(
        "relay_upstream_connection_failures_total",
        {"upstream": "up", "reason": "tls_certificate"}) == 1
    assert r.metrics.registry.get_sample_value(
        "relay_messages_deferred_total", {"upstream": "up", "reply_class": "tls_certificate"}) == 1


async def test_attempt_past_grace_is_cancelled_and_kept(rigs: list[Rig],
                                                        peers: list[RecordingUpstream],
                                                        tmp_path: Path) -> None:
    slow = await peer(peers, delays={"DATA": 30.0})
    first = Rig(tmp_path, upstream(slow.port))
    await first.start()
    qid = await first.send(BODY)
    await until(lambda: first.scheduler.in_flight(qid))
    await first.scheduler.stop(grace=0.2)
    assert not first.scheduler.in_flight(qid)
    assert first.spool.load(qid).state.attempts == 0       # nothing recorded: tried again
    async with asyncio.timeout(3):     # the interrupted session was dropped, not kept idle
        await first.deliverer.close()
    await slow.wait_for(lambda p: p.open_now == 0, timeout=3)
    first.spool.close()
    fast = await peer(peers)
    r = await rig(rigs, tmp_path, upstream(fast.port))     # the restart
    await r.drained()
    assert [m.rcpt_tos for m in fast.received] == [["bob@example.net"]]


def held_for_quota(wait: dict[str, Any] | None) -> bool:
    """Held by the quota for the rest of a window: not the brief waits before, for a
    connection the first sends still hold or (1 s at a time) for them to settle."""
    return wait is not None and wait["reason"] == "quota" and wait["until"] - time.time() > 2


async def test_rate_limits_delay_per_mailbox(rigs: list[Rig], peers: list[RecordingUpstream],
                                             tmp_path: Path) -> None:
    p = await peer(peers)
    profile = ProfileConfig(name="tight", messages_per_minute=2)
    r = await rig(rigs, tmp_path, upstream(p.port, profile="tight"),
                  profiles={"up": profile})
    ids = [await r.send(BODY, rcpts=(f"r{i}@example.net",)) for i in range(3)]
    other = await r.send(BODY, sender="bob@example.com")
    await until(lambda: len(r.spool.queue_ids()) == 1)       # the 3rd of alice's waits
    assert sorted(m.mail_from for m in p.received) == [
        "alice@example.com", "alice@example.com", "bob@example.com"]
    assert other not in r.spool.queue_ids()
    [paced] = [q for q in ids if q in r.spool.queue_ids()]
    assert r.spool.load(paced).state.attempts == 0          # waiting is not failing
    await until(lambda: held_for_quota(r.scheduler.waiting(paced)))
    wait = r.scheduler.waiting(paced)
    assert wait is not None and wait["reason"] == "quota"
    assert 50 < wait["until"] - time.time() <= 61
    assert wait["text"].startswith("waiting for quota: 2/min of tight for alice@example.com, "
                                   "next at ")
    assert r.lines("deferred") == []


async def test_rate_limits_hold_for_a_recovered_burst(rigs: list[Rig],
                                                      peers: list[RecordingUpstream],
                                                      tmp_path: Path) -> None:
    """All due at once after a restart: dispatched together, still only 2 per minute."""
    p = await peer(peers)
    profile = ProfileConfig(name="tight", messages_per_minute=2)
    before = Rig(tmp_path, upstream(p.port))
    before.spool.recover()
    for i in range(4):
        await before.send(BODY, rcpts=(f"r{i}@example.net",))
    before.spool.close()
    started = time.time()       # the window opens when the first two leave, after this
    r = await rig(rigs, tmp_path, upstream(p.port, profile="tight"), profiles={"up": profile})
    await until(lambda: len(p.received) == 2 and len(r.spool.queue_ids()) == 2 and all(
        held_for_quota(r.scheduler.waiting(q)) for q in r.spool.queue_ids()))
    waiting = {q: r.scheduler.waiting(q) for q in r.spool.queue_ids()}
    # Held for the rest of the minute that began with the first sends (however long this
    # loaded machine took to get here), and not much longer.
    assert all(w is not None and started + 59 < w["until"] <= time.time() + 61
               for w in waiting.values())
    assert all(r.spool.load(q).state.attempts == 0 for q in waiting)
    assert r.lines("deferred") == []


async def test_wait_idle_passes_its_callers_cancellation_on(rigs: list[Rig],
                                                            peers: list[RecordingUpstream],
                                                            tmp_path: Path) -> None:
    """A queue command waiting for an attempt in flight can itself be cancelled (client
    gone, shutdown); the cancellation must reach it, and the attempt must go on."""
    p = await peer(peers, delays={"DATA": 0.6})
    r = await rig(rigs, tmp_path, upstream(p.port))
    qid = await r.send(BODY)
    await until(lambda: r.scheduler.in_flight(qid))
    waiter = asyncio.ensure_future(r.scheduler.wait_idle(qid))
    await asyncio.sleep(0.05)          # let it reach its wait on the attempt
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert r.scheduler.in_flight(qid)                # the attempt was not cancelled
    await r.scheduler.wait_idle(qid)                 # and an uncancelled wait sees it end
    assert not r.scheduler.in_flight(qid) and len(p.received) == 1


async def test_wait_idle_returns_when_the_attempt_itself_is_cancelled(
        rigs: list[Rig], peers: list[RecordingUpstream], tmp_path: Path) -> None:
    p = await peer(peers, delays={"DATA": 30.0})
    r = await rig(rigs, tmp_path, upstream(p.port))
    qid = await r.send(BODY)
    await until(lambda: r.scheduler.in_flight(qid))
    waiter = asyncio.ensure_future(r.scheduler.wait_idle(qid))
    await r.scheduler.stop(grace=0.1)                # cancels the attempt past its grace
    async with asyncio.timeout(5):
        await waiter                                 # returns, does not raise
