"""QueueManager against a real spool and a fake scheduler hook."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import pytest

from relay.control.queue import QueueManager
from relay.errors import ControlError
from tests.queue.conftest import FakeScheduler, Queue

pytestmark = pytest.mark.fast


@pytest.fixture
def hook(queue: Queue) -> FakeScheduler:
    return FakeScheduler(queue.spool)


@pytest.fixture
def mgr(queue: Queue, hook: FakeScheduler) -> QueueManager:
    return QueueManager(queue.spool, hook)


async def test_list(queue: Queue, mgr: QueueManager, hook: FakeScheduler) -> None:
    fresh, deferred, held = queue.ids
    hook.start_attempt(fresh)
    result = await mgr.handle("list", {})
    assert result["count"] == 3 and result["counts"] == {"active": 1, "deferred": 1, "held": 1,
                                                          "waiting": 0}
    assert [m["id"] for m in result["messages"]] == queue.ids
    by_id = {m["id"]: m for m in result["messages"]}
    assert by_id[fresh]["state"] == "active" and by_id[fresh]["in_flight"]
    d = by_id[deferred]
    assert d["state"] == "deferred" and d["attempts"] == 1 and d["sender"] == "agent@example.com"
    assert d["recipients"] == [
        {"address": "a@example.net", "status": "delivered", "attempts": 0,
         "last_reply": "250 2.0.0 OK"},
        {"address": "b@example.net", "status": "pending", "attempts": 0,
         "last_reply": "451 4.7.0 greylisted"}]
    assert by_id[held]["state"] == "held"
    assert result["size"] == sum(m["size"] for m in result["messages"]) > 0
    assert 99 <= d["age"] < 200


async def test_show(queue: Queue, mgr: QueueManager) -> None:
    shown = await mgr.handle("show", {"id": queue.ids[1].lower()})    # ids are case-blind
    assert shown["id"] == queue.ids[1]
    assert shown["envelope"]["recipients"] == ["a@example.net", "b@example.net"]
    assert shown["envelope"]["auth_user"] == "cc1"
    assert shown["headers"].splitlines()[2] == "Subject: Your case 42"
    assert "Hello" not in shown["headers"]


@pytest.mark.parametrize("command", ["show", "retry", "hold", "release", "delete"])
async def test_unknown_and_malformed_ids(mgr: QueueManager, command: str) -> None:
    with pytest.raises(ControlError) as err:
        await mgr.handle(command, {"id": "0" * 17})
    assert err.value.code == "not_found" and "relay queue list" in err.value.hint
    for bad in ("../../etc/passwd", "", None, 42):
        with pytest.raises(ControlError) as err:
            await mgr.handle(command, {"id": bad})
        assert err.value.code == "bad_request"


async def test_unknown_command(mgr: QueueManager) -> None:
    with pytest.raises(ControlError, match="unknown queue command 'flush'"):
        await mgr.handle("flush", {})


async def test_retry(queue: Queue, mgr: QueueManager, hook: FakeScheduler) -> None:
    fresh, deferred, held = queue.ids
    assert await mgr.handle("retry", {"id": deferred}) == {"retried": [deferred],
                                                          "skipped_held": 0}
    assert queue.spool.load(deferred).state.next_attempt == 0
    assert ("retry_now", deferred) in hook.calls        # past pauses, not just rescheduled
    with pytest.raises(ControlError) as err:
        await mgr.handle("retry", {"id": held})
    assert err.value.code == "held" and f"relay queue release {held}" in err.value.hint

    result = await mgr.handle("retry", {"all": True})
    assert result == {"retried": [fresh, deferred], "skipped_held": 1}
    assert fresh + ".state" not in os.listdir(queue.spool.queue)   # nothing to write


async def test_retry_several(queue: Queue, mgr: QueueManager, hook: FakeScheduler) -> None:
    fresh, deferred, held = queue.ids
    result = await mgr.handle("retry", {"ids": [deferred, held, fresh.lower()]})
    assert result["done"] == [deferred, fresh] and result["held"] == [held]
    assert [c for c in hook.calls if c[0] == "retry_now"] == [("retry_now", deferred),
                                                              ("retry_now", fresh)]
    result = await mgr.handle("retry", {"ids": [deferred, "0" * 17]})
    assert result["done"] == [deferred] and result["missing"] == ["0" * 17]


async def test_list_says_what_a_due_message_waits_for(queue: Queue, mgr: QueueManager,
                                                      hook: FakeScheduler) -> None:
    fresh = queue.ids[0]
    text = "waiting for quota: 10/min of zendesk-exchange-connector for support@example.com"
    hook.waits[fresh] = {"reason": "quota", "until": time.time() + 30, "text": text}
    result = await mgr.handle("list", {})
    entry = next(m for m in result["messages"] if m["id"] == fresh)
    assert entry["state"] == "waiting" and entry["waiting"]["text"] == text
    assert result["counts"]["waiting"] == 1 and result["counts"]["active"] == 0


async def test_hold_and_release(queue: Queue, mgr: QueueManager, hook: FakeScheduler,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.mail")
    fresh = queue.ids[0]
    assert await mgr.hold(fresh) == {"held": fresh, "already": False}
    assert queue.spool.load(fresh).state.held
    assert hook.calls == [("forget", fresh), ("forget", fresh)]
    assert await mgr.hold(fresh) == {"held": fresh, "already": True}
    assert queue.spool.stats().counts["held"] == 2

    hook.calls.clear()
    assert await mgr.release(fresh) == {"released": fresh, "already": False}
    assert not queue.spool.load(fresh).state.held
    assert hook.calls == [("reschedule", fresh)]
    assert await mgr.release(fresh) == {"released": fresh, "already": True}
    lines = [r.getMessage() for r in caplog.records]
    assert f"{fresh}: held by=operator" in lines and f"{fresh}: released by=operator" in lines


async def test_hold_during_an_attempt_survives_the_attempts_own_save(
        queue: Queue, mgr: QueueManager, hook: FakeScheduler) -> None:
    qid = queue.ids[0]
    hook.start_attempt(qid)
    holding = asyncio.ensure_future(mgr.hold(qid))
    await asyncio.wait_for(hook.idle_waited.wait(), 10)
    assert not holding.done()                      # waits for the attempt to end
    await hook.finish(qid)                         # the attempt saves its state first
    assert await asyncio.wait_for(holding, 10) == {"held": qid, "already": False}
    state = queue.spool.load(qid).state
    assert state.held and state.attempts == 1     # both changes kept
    assert hook.calls[0] == ("forget", qid) and hook.calls[-1] == ("forget", qid)


async def test_delete_waits_for_the_attempt_in_flight(
        queue: Queue, mgr: QueueManager, hook: FakeScheduler,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.mail")
    qid = queue.ids[1]
    hook.start_attempt(qid)
    deleting = asyncio.ensure_future(mgr.handle("delete", {"id": qid}))
    await asyncio.wait_for(hook.idle_waited.wait(), 10)
    assert not deleting.done() and qid in queue.spool.queue_ids()
    await hook.finish(qid)
    assert await asyncio.wait_for(deleting, 10) == {"deleted": qid, "waited_for_attempt": True}
    assert qid not in queue.spool.queue_ids()
    assert sorted(os.listdir(queue.spool.queue)) == sorted(
        [queue.ids[0], queue.ids[2], queue.ids[2] + ".state"])
    assert ("forget", qid) in hook.calls
    assert any(r.getMessage().startswith(f"{qid}: deleted by=operator from=<agent@example.com>"
                                         " pending=1") for r in caplog.records)


async def test_without_a_scheduler(queue: Queue) -> None:
    """Direct mode (no relay running): the same operations on the files alone."""
    mgr = QueueManager(queue.spool)
    fresh, deferred, held = queue.ids
    await mgr.hold(fresh)
    await mgr.release(held)
    await mgr.retry(deferred)
    await mgr.delete(fresh)
    assert queue.spool.queue_ids() == [deferred, held]
    assert not queue.spool.load(held).state.held
    assert queue.spool.load(deferred).state.next_attempt == 0
