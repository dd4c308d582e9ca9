"""Batched removal of finished messages (relay.spool.reaper), with a pool we hold back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from relay.errors import SpoolError
from relay.spool.reaper import Reaper, unlink_all


class HeldPool:
    """Stands in for ``offload.Pool.run``: each call waits until the test lets it run."""

    def __init__(self) -> None:
        self.calls: list[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = []

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.calls.append((fn, args, fut))
        return fut

    def batches(self) -> list[list[str]]:
        return [[q for q, _ in args[1]] for _, args, _ in self.calls]

    async def finish(self, index: int) -> None:
        fn, args, fut = self.calls[index]
        fut.set_result(fn(*args))
        await asyncio.sleep(0)               # the reaper's callback
        await asyncio.sleep(0)               # the callers it settled


class Disk:
    def __init__(self, failing: frozenset[str] = frozenset()) -> None:
        self.removed: list[tuple[str, bool]] = []
        self.failing = failing

    def unlink(self, queue_id: str, with_state: bool) -> None:
        if queue_id in self.failing:
            raise SpoolError(f"cannot remove {queue_id}: Input/output error")
        self.removed.append((queue_id, with_state))


@pytest.mark.fast
async def test_a_removal_at_a_trickle_goes_at_once_alone() -> None:
    pool, disk = HeldPool(), Disk()
    reaper = Reaper(disk.unlink, pool.run)
    done = asyncio.ensure_future(reaper.remove("A", False))
    await asyncio.sleep(0)
    assert pool.batches() == [["A"]] and not done.done()
    await pool.finish(0)
    assert done.done() and done.result() is None
    assert disk.removed == [("A", False)]


@pytest.mark.fast
async def test_removals_queued_while_the_lanes_are_busy_go_in_one_call() -> None:
    pool, disk = HeldPool(), Disk()
    reaper = Reaper(disk.unlink, pool.run, lanes=2, batch=3)
    futs = [reaper.remove(q, q == "C") for q in "ABCDEFG"]
    assert pool.batches() == [["A"], ["B"]]           # two lanes, each busy
    assert reaper.queued == 5
    await pool.finish(0)                                # a lane frees: the next batch
    assert pool.batches() == [["A"], ["B"], ["C", "D", "E"]]
    assert [f.done() for f in futs] == [True] + [False] * 6
    await pool.finish(2)
    assert pool.batches()[3] == ["F", "G"]
    await pool.finish(1)
    await pool.finish(3)
    assert all(f.done() for f in futs) and reaper.queued == 0
    assert disk.removed == [("A", False), ("C", True), ("D", False), ("E", False),
                            ("B", False), ("F", False), ("G", False)]
    assert len(pool.calls) == 4                         # seven removals, four thread calls


@pytest.mark.fast
async def test_a_failed_unlink_reaches_only_its_caller() -> None:
    pool, disk = HeldPool(), Disk(failing=frozenset({"B"}))
    reaper = Reaper(disk.unlink, pool.run, lanes=1)
    first = reaper.remove("A", False)
    rest = [reaper.remove(q, False) for q in "BC"]
    await pool.finish(0)
    await pool.finish(1)
    assert first.result() is None and rest[1].result() is None
    with pytest.raises(SpoolError, match="cannot remove B"):
        rest[0].result()
    assert disk.removed == [("A", False), ("C", False)]


@pytest.mark.fast
async def test_a_cancelled_caller_does_not_stop_the_others_nor_its_unlink() -> None:
    pool, disk = HeldPool(), Disk()
    reaper = Reaper(disk.unlink, pool.run, lanes=1)
    reaper.remove("A", False)
    gone, kept = reaper.remove("B", False), reaper.remove("C", False)
    gone.cancel()
    await pool.finish(0)
    await pool.finish(1)
    assert kept.result() is None and gone.cancelled()
    assert disk.removed == [("A", False), ("B", False), ("C", False)]


@pytest.mark.fast
async def test_the_pool_itself_failing_fails_the_whole_batch() -> None:
    pool, disk = HeldPool(), Disk()
    reaper = Reaper(disk.unlink, pool.run, lanes=1)
    futs = [reaper.remove(q, False) for q in "AB"]
    pool.calls[0][2].set_exception(RuntimeError("pool shut down"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert all(isinstance(f.exception(), RuntimeError) for f in futs[:1])
    await pool.finish(1)
    assert futs[1].result() is None


@pytest.mark.fast
def test_unlink_all_reports_each_removal() -> None:
    disk = Disk(failing=frozenset({"B"}))
    outcome = unlink_all(disk.unlink, [("A", True), ("B", False), ("C", False)])
    assert outcome[0] is None and outcome[2] is None
    assert isinstance(outcome[1], SpoolError)
