"""The per-process worker thread that DKIM signing runs on and the pool the spool writes
through (``relay.offload``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from relay.offload import Pool, Worker


async def test_calls_run_in_order_on_one_other_thread() -> None:
    w = Worker("test-worker")
    seen: list[tuple[int, int]] = []

    def job(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * i
    results = await asyncio.gather(*(w.run(lambda i=i: job(i)) for i in range(50)))
    assert results == [i * i for i in range(50)]
    assert [i for i, _ in seen] == list(range(50))
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threading.get_ident() not in threads


async def test_an_exception_reaches_its_caller_only() -> None:
    w = Worker("test-worker")

    def bad() -> int:
        raise ValueError("no key")
    calls = [w.run(lambda: 1), w.run(bad), w.run(lambda: 3)]
    async with asyncio.timeout(10):                    # a dead thread would never answer
        out = await asyncio.gather(*calls, return_exceptions=True)
    assert out[0] == 1 and out[2] == 3
    assert isinstance(out[1], ValueError) and str(out[1]) == "no key"
    assert await w.run(lambda: 4) == 4                 # the thread survived it


async def test_the_loop_runs_while_the_worker_is_busy() -> None:
    """A call that releases the GIL (as RSA signing does) leaves the event loop free."""
    w = Worker("test-worker")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1
    ticker = asyncio.create_task(tick())
    try:
        await w.run(lambda: time.sleep(0.5))
    finally:
        ticker.cancel()
    assert ticks >= 5                                  # inline, it would be 0


async def test_a_cancelled_caller_does_not_stop_the_worker() -> None:
    w = Worker("test-worker")
    gate = threading.Event()
    slow = asyncio.ensure_future(w.run(gate.wait))
    await asyncio.sleep(0.05)
    slow.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await slow
    assert await w.run(lambda: "still here") == "still here"


def test_one_worker_serves_successive_event_loops() -> None:
    """Tests and reloads run several loops over a process's life; results go to the loop
    that asked."""
    w = Worker("test-worker")
    for n in range(3):
        assert asyncio.run(w.run(lambda n=n: n + 100)) == n + 100


# --- Pool: the spool's threads ------------------------------------------------------------


async def test_a_pool_runs_its_calls_side_by_side_and_answers_each_caller() -> None:
    pool = Pool("test-pool", threads=4)
    meet = threading.Barrier(4, timeout=10)     # passes only if all four run at once

    def job(i: int) -> int:
        meet.wait()
        return i * i

    def bad() -> int:
        raise OSError(28, "No space left on device")
    out = await asyncio.gather(*(pool.run(job, i) for i in range(4)), pool.run(bad),
                               return_exceptions=True)
    assert out[:4] == [0, 1, 4, 9]
    assert isinstance(out[4], OSError) and out[4].errno == 28
    assert await pool.run(lambda: "still here") == "still here"


async def test_results_that_finish_while_the_loop_is_busy_wake_it_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pool = Pool("test-pool", threads=4)
    assert await pool.run(lambda: 0) == 0      # threads started
    loop = asyncio.get_running_loop()
    wakeups = 0
    real = loop.call_soon_threadsafe

    def counted(*args: object, **kwargs: object) -> asyncio.Handle:
        nonlocal wakeups
        wakeups += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]
    monkeypatch.setattr(loop, "call_soon_threadsafe", counted)
    gate = threading.Event()
    calls = [pool.run(gate.wait, 10) for _ in range(4)]
    gate.set()
    time.sleep(0.3)   # noqa: ASYNC251  (on purpose: the loop is busy while all four finish)
    assert await asyncio.gather(*calls) == [True] * 4
    assert wakeups == 1


async def test_a_cancelled_caller_leaves_its_call_to_finish() -> None:
    pool = Pool("test-pool", threads=2)
    gate, ran = threading.Event(), threading.Event()

    def job() -> None:
        gate.wait(10)
        ran.set()
    waiting = pool.run(job)
    waiting.cancel()
    gate.set()
    assert await pool.run(lambda: "next") == "next"
    assert ran.wait(10)


def test_one_pool_serves_successive_event_loops() -> None:
    pool = Pool("test-pool", threads=2)
    for n in range(3):
        async def ask(n: int = n) -> int:
            return await pool.run(lambda: n + 100)
        assert asyncio.run(ask()) == n + 100
