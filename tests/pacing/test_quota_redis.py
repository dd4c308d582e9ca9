"""Quotas shared through a real redis-server: atomic across replicas, a local share when
Redis is gone, shared again (with this replica's sends written back) when it returns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.config.schema import PacingSection
from relay.metrics import Metrics
from relay.outbound.pacing import Claim, Cost, Limit, Verdict, edge_margin
from relay.outbound.quota_redis import RedisQuotas
from tests.delivery.helpers import sample
from tests.peers.redis import RedisServer, redis_server

PER_2S = (Limit("messages", 6, 2.0, "mailbox", "test"),)


def claims(key: str = "up/alice@example.com", limits: tuple[Limit, ...] = PER_2S,
           recipients: int = 1) -> list[Claim]:
    return [Claim(key, limits, Cost(1, recipients, 100))]


@pytest.fixture
def server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    with redis_server(tmp_path) as s:
        yield s


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisQuotas]]:
    made: list[RedisQuotas] = []
    yield made
    for s in made:
        await s.close()


def replica(stores: list[RedisQuotas], server: RedisServer, *, replicas: int = 2,
            metrics: Metrics | None = None, retry: float = 0.2,
            **kw: float) -> RedisQuotas:
    cfg = PacingSection(backend="redis", redis_url=server.url, replicas=replicas,
                        timeout=0.5, retry_interval=retry, key_prefix="t")
    store = RedisQuotas(cfg, metrics=metrics, **kw)
    stores.append(store)
    return store


async def take(store: RedisQuotas, n: int, **kw: object) -> list[Verdict]:
    out = []
    for _ in range(n):
        verdict = await store.reserve(claims(**kw))  # type: ignore[arg-type]
        if verdict.ticket is not None:
            await store.settle(verdict.ticket)
        out.append(verdict)
    return out


async def test_two_replicas_stay_within_one_quota_together(
        server: RedisServer, stores: list[RedisQuotas]) -> None:
    a, b = replica(stores, server), replica(stores, server)
    got = await asyncio.gather(*(s.reserve(claims()) for s in (a, b) * 8))  # 16 at once
    reserved = [v for v in got if v.ticket is not None]
    waiting = [v for v in got if v.ticket is None]
    assert len(reserved) == 6 and len(waiting) == 10            # the fleet: 6 per window
    assert all(0 < v.wait <= 2.0 + edge_margin(2.0) + 0.05 for v in waiting)
    assert waiting[0].limit is not None and waiting[0].limit.describe() == "6 per 2 s of test"
    other = await b.reserve(claims("up/bob@example.com"))       # per mailbox
    assert other.ticket is not None


async def test_a_send_counts_until_it_settles(server: RedisServer,
                                              stores: list[RedisQuotas]) -> None:
    a = replica(stores, server)
    held = [await a.reserve(claims()) for _ in range(6)]          # in flight, not settled
    await asyncio.sleep(2.2)           # the window passes (a real server's clock moves)
    assert (await a.reserve(claims())).wait > 0                  # still counted: in flight
    for v in held:
        assert v.ticket is not None
        await a.settle(v.ticket)
    verdict = await a.reserve(claims())                          # counted from now on
    assert verdict.ticket is None and 1.9 < verdict.wait <= 2.0 + edge_margin(2.0) + 0.05


async def test_an_attempt_longer_than_its_lease_counts_again_when_it_ends(
        server: RedisServer, stores: list[RedisQuotas]) -> None:
    a = replica(stores, server, lease=0.3)
    held = [await a.reserve(claims()) for _ in range(6)]
    await asyncio.sleep(2.5)                    # lease and window over: no longer counted
    extra = await a.reserve(claims())
    assert extra.ticket is not None
    for v in [*held, extra]:
        assert v.ticket is not None
        await a.settle(v.ticket)                # ... until they end: counted from now
    assert (await a.reserve(claims())).wait > 1.9


async def test_recipients_and_several_limits_in_one_script(
        server: RedisServer, stores: list[RedisQuotas]) -> None:
    a = replica(stores, server)
    limits = (Limit("messages", 100, 60.0), Limit("recipients", 10, 60.0))
    assert (await a.reserve(claims(limits=limits, recipients=7))).ticket is not None
    verdict = await a.reserve(claims(limits=limits, recipients=4))
    assert verdict.ticket is None and verdict.limit == limits[1]
    assert (await a.reserve(claims(limits=limits, recipients=3))).ticket is not None


async def test_redis_gone_then_back(server: RedisServer, stores: list[RedisQuotas],
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.pacing")
    metrics = Metrics()
    a = replica(stores, server, replicas=3, metrics=metrics)
    assert all(v.ticket for v in await take(a, 2))
    server.stop()                                               # Redis is gone
    verdicts = await take(a, 6)
    # a local share: 6 / 3 replicas = 2 per window, and this replica already sent 2
    assert [v.ticket is not None for v in verdicts] == [False] * 6
    assert not a.shared and sample(metrics, "relay_pacing_shared") == 0
    assert sample(metrics, "relay_pacing_fallbacks_total") == 1
    [warning] = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert f"Redis at {server.url} is unreachable" in warning.getMessage()
    assert "local share of each quota (1/3)" in warning.getMessage()
    await asyncio.sleep(2.2)                                    # the window passes
    assert [v.ticket is not None for v in await take(a, 3)] == [True, True, False]
    server.start()                                              # back, and empty
    await asyncio.sleep(0.25)                                   # past retry_interval
    b = replica(stores, server, replicas=3)
    # the 2 sends made meanwhile are written back: the fleet has 4 of 6 left; a itself
    # keeps to its share (2, used) for a window more, until every replica caught up
    results = [v.ticket is not None for v in await take(a, 1) + await take(b, 5)]
    assert results == [False, True, True, True, True, False]
    assert a.shared and sample(metrics, "relay_pacing_shared") == 1
    assert any("answers again" in r.getMessage() and "2 send(s)" in r.getMessage()
               for r in caplog.records)


async def test_a_hung_redis_is_unreachable_after_the_timeout(
        server: RedisServer, stores: list[RedisQuotas]) -> None:
    a = replica(stores, server, replicas=2)
    await take(a, 1)
    server.pause()
    try:
        async with asyncio.timeout(3):           # never blocks delivery for long
            verdict = await a.reserve(claims())
        # unreachable: its local share, after the window the outage began in
        assert verdict.ticket is None and 1.9 < verdict.wait <= 2.0 + edge_margin(2.0)
        assert not a.shared
    finally:
        server.resume()


async def test_a_window_across_the_outage_stays_within_the_quota(
        server: RedisServer, stores: list[RedisQuotas]) -> None:
    """The fleet used its whole quota unevenly (5 + 1 of 6) just before Redis went away:
    neither replica's local share (3) may add to that window."""
    a, b = replica(stores, server), replica(stores, server)
    assert all(v.ticket for v in await take(a, 5) + await take(b, 1))
    server.stop()
    assert [v.ticket is not None for v in await take(b, 2) + await take(a, 1)] == [False] * 3
    await asyncio.sleep(2.2)                             # that window has passed
    assert [v.ticket is not None for v in await take(b, 4)] == [True, True, True, False]
