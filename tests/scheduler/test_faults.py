"""The scheduler under faults of its own: a spool that cannot record."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config.schema import RetryConfig
from tests.delivery.helpers import BODY, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.peers.tmpfs import read_only, tmpfs
from tests.scheduler.rig import Rig, until


@pytest.fixture
async def peers() -> AsyncIterator[list[RecordingUpstream]]:
    started: list[RecordingUpstream] = []
    yield started
    for p in started:
        await p.stop()


async def peer(peers: list[RecordingUpstream], **kw: object) -> RecordingUpstream:
    p = RecordingUpstream(**kw)  # type: ignore[arg-type]
    await p.start()
    peers.append(p)
    return p


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
