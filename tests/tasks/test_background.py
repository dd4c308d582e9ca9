"""relay.tasks.Background: failures logged with their traceback, close cancels and awaits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from relay.tasks import Background

pytestmark = pytest.mark.fast

log = logging.getLogger("relay.test.background")


async def test_a_failure_is_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    bg = Background("tester", log)

    async def boom() -> None:
        raise RuntimeError("disk on fire")

    with caplog.at_level(logging.ERROR, logger="relay.test.background"):
        task = bg.spawn(boom(), name="boom")
        await asyncio.wait([task])
        await asyncio.sleep(0)               # let the done callback run
    [record] = caplog.records
    assert "tester: background task boom failed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError
    assert "disk on fire" in caplog.text and "Traceback" in caplog.text
    assert len(bg) == 0


async def test_close_cancels_and_waits_for_every_task() -> None:
    bg = Background("tester", log)
    ended: list[str] = []

    async def slow(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)        # cleanup that must be awaited, not abandoned
            ended.append(name)

    for n in ("a", "b"):
        bg.spawn(slow(n), name=n)
    await asyncio.sleep(0)
    async with asyncio.timeout(2):
        await bg.close()
    assert sorted(ended) == ["a", "b"] and len(bg) == 0


async def test_cancellation_is_not_logged_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    bg = Background("tester", log)
    with caplog.at_level(logging.ERROR, logger="relay.test.background"):
        bg.spawn(asyncio.sleep(60), name="sleeper")
        await asyncio.sleep(0)
        await bg.close()
    assert caplog.records == []


async def test_wait_lets_tasks_finish_by_themselves() -> None:
    bg = Background("tester", log)
    bg.spawn(asyncio.sleep(0.01), name="quick")
    assert await bg.wait(timeout=2) is True
    bg.spawn(asyncio.sleep(60), name="slow")
    assert await bg.wait(timeout=0.05) is False
    await bg.close()
