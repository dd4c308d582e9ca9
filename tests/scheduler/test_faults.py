"""The scheduler under faults of its own: a spool that cannot record, a wall clock that jumps."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from relay.config.schema import RetryConfig
from relay.spool.records import RcptStatus
from tests.delivery.helpers import BODY, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers.tmpfs import read_only, tmpfs
from tests.scheduler.rig import FAST, Rig, until

DAY = 86400.0


async def peer(peers: list[RecordingUpstream], **kw: object) -> RecordingUpstream:
    p = RecordingUpstream(**kw)  # type: ignore[arg-type]
    await p.start()
    peers.append(p)
    return p


class Wall:
    """A wall clock the test can step, as NTP or an operator's `date -s` would."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def gauge(r: Rig, name: str) -> float:
    return r.metrics.registry.get_sample_value(name) or 0.0


async def test_an_outcome_the_spool_cannot_record_is_not_sent_again(
        peers: list[RecordingUpstream], tmp_path: Path, caplog: pytest.LogCaptureFixture
        ) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.scheduler")
    p = await peer(peers, delays={"DATA": 0.3})
    with tmpfs(tmp_path / "fs", "1m") as fs:
        r = Rig(fs, upstream(p.port), retry=RetryConfig(first=0.05, max=0.1, jitter=0.0))
        await r.start()
        try:
            qid = await r.send(BODY)
            await until(lambda: r.scheduler.in_flight(qid))
            read_only(fs)                     # the upstream takes it; the removal fails
            try:
                await until(lambda: gauge(r, "relay_delivery_unrecorded_outcomes") == 1)
                [kept] = [m for m in caplog.messages if "cannot record" in m]
                assert kept.startswith(f"{qid}: delivered to everyone, but the spool cannot "
                                       "record it: ")
                assert "read-only" in kept.lower() and "not sent again" in kept
                # Recording is retried (and fails) several times; nothing is sent again.
                await until(lambda: sum("still unrecorded" in m for m in caplog.messages) >= 4)
                assert len(p.received) == 1
                assert qid not in r.scheduler.scheduled()
                r.scheduler.reschedule(qid)   # an operator's `queue retry` reads stale state
                await until(lambda: sum("still unrecorded" in m for m in caplog.messages) >= 5)
                assert len(p.received) == 1
                assert not any(rec.exc_info for rec in caplog.records)   # no tracebacks
            finally:
                read_only(fs, on=False)
            await r.drained()
            assert gauge(r, "relay_delivery_unrecorded_outcomes") == 0
            assert f"{qid}: delivery outcome recorded in the spool after all" in caplog.messages
            assert len(p.received) == 1
        finally:
            await r.stop()


async def test_a_wall_clock_step_forward_neither_bursts_nor_expires(
        peers: list[RecordingUpstream], tmp_path: Path) -> None:
    rcpts = [f"r{i}@example.net" for i in range(4)]
    p = await peer(peers, rcpt_script={a: ["451 4.3.0 busy"] * 50 for a in rcpts})
    wall = Wall()
    r = Rig(tmp_path, upstream(p.port), clock=wall,
            retry=RetryConfig(first=60.0, max=60.0, jitter=0.0, lifetime=DAY))
    await r.start()
    try:
        ids = [await r.send(BODY, rcpts=(a,)) for a in rcpts]
        await until(lambda: all(r.spool.load(q).state.attempts == 1 for q in ids))
        wall.offset = 2 * DAY                          # NTP steps two days ahead
        late = await r.send(BODY, rcpts=("now@example.net",))   # wakes the scheduler
        await until(lambda: late not in r.spool.queue_ids())
        assert [m.rcpt_tos for m in p.received] == [["now@example.net"]]
        # The four deferred messages are neither retried at once nor given up on.
        assert all(r.spool.load(q).state.attempts == 1 for q in ids)
        assert r.lines("bounced") == []
        assert all(50 < due - wall() <= 60 for q, due in r.scheduler.scheduled().items())
        # An operator's retry now: the provider still says 451, and the message, two
        # wall-clock days "old" but only seconds in the queue, is deferred, not bounced.
        msg = r.spool.load(ids[0])
        msg.state.next_attempt = 0.0
        await r.spool.save_state(msg)
        r.scheduler.reschedule(ids[0])
        await until(lambda: r.spool.load(ids[0]).state.attempts == 2)
        assert r.lines("bounced") == []
        assert r.spool.load(ids[0]).state.recipients[0].status is RcptStatus.PENDING
    finally:
        await r.stop()


async def test_a_wall_clock_step_back_does_not_stall_retries(
        peers: list[RecordingUpstream], tmp_path: Path) -> None:
    p = await peer(peers, rcpt_script={"bob@example.net": ["451 4.3.0 busy"]})
    wall = Wall()
    r = Rig(tmp_path, upstream(p.port), clock=wall,
            retry=RetryConfig(first=0.3, max=0.3, jitter=0.0, lifetime=DAY))
    await r.start()
    try:
        qid = await r.send(BODY)
        await until(lambda: r.spool.load(qid).state.attempts == 1)
        wall.offset = -2 * DAY                         # the clock is set back two days
        await r.drained(timeout=10)                    # retried 0.3 s later all the same
        assert [m.rcpt_tos for m in p.received] == [["bob@example.net"]]
        assert r.lines("bounced") == []
    finally:
        await r.stop()


async def test_a_recorded_due_time_from_before_a_step_back_waits_one_backoff_at_most(
        peers: list[RecordingUpstream], tmp_path: Path) -> None:
    p = await peer(peers)
    before = Rig(tmp_path, upstream(p.port))
    before.spool.recover()
    qid = await before.send(BODY)
    msg = before.spool.load(qid)
    msg.state.attempts = 1
    msg.state.next_attempt = time.time() + 2 * DAY     # written before the clock went back
    await before.spool.save_state(msg)
    before.spool.close()
    r = Rig(tmp_path, upstream(p.port), retry=FAST)    # max 0.2 s (+10% jitter)
    await r.start()
    try:
        assert all(due - time.time() <= 0.25 for due in r.scheduler.scheduled().values())
        await r.drained(timeout=10)
        assert len(p.received) == 1
    finally:
        await r.stop()


async def test_a_retry_due_before_its_state_is_written_is_not_lost(
        peers: list[RecordingUpstream], tmp_path: Path) -> None:
    """Found by bench/soak.py: when writing the state took longer than the backoff, the
    retry came due while the attempt was still in flight, was skipped, and the message
    stayed queued, never tried again until a restart. The shortest retry (1 ms) makes
    every deferral hit it."""
    rcpts = [f"r{i}@example.net" for i in range(20)]
    p = await peer(peers, rcpt_script={a: ["451 4.3.0 busy"] * 3 for a in rcpts})
    r = Rig(tmp_path, upstream(p.port),
            retry=RetryConfig(first=0.001, max=0.001, jitter=0.0, lifetime=3600))
    await r.start()
    try:
        for a in rcpts:
            await r.send(BODY, rcpts=(a,))
        await r.drained(timeout=20)
        assert sorted(m.rcpt_tos[0] for m in p.received) == sorted(rcpts)
    finally:
        await r.stop()
