"""The ledger of unrecorded outcomes on its own, with a spool that fails on demand (a fake)."""

from __future__ import annotations

import logging
import time

import pytest

from relay.envelope import Envelope
from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.outbound.ledger import Unrecorded
from relay.spool.records import QueuedMessage, QueueState, Recipient
from tests.scheduler.rig import until

pytestmark = pytest.mark.fast


class FlakySpool:
    """Refuses the first ``failures`` writes, then records them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.saved: list[str] = []
        self.removed: list[str] = []

    def _maybe_fail(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise SpoolError("spool /x: cannot write a state file: Read-only file system")

    async def save_state(self, msg: QueuedMessage) -> None:
        self._maybe_fail()
        self.saved.append(msg.queue_id)

    async def remove(self, queue_id: str) -> None:
        self._maybe_fail()
        self.removed.append(queue_id)


def message(qid: str) -> QueuedMessage:
    env = Envelope(sender="a@example.com", recipients=("b@example.net",),
                   received_at=time.time())
    return QueuedMessage(queue_id=qid, envelope=env,
                         state=QueueState(recipients=[Recipient("b@example.net")]), size=10)


async def test_outcomes_wait_until_written_then_pending_ones_are_handed_back(
        caplog: pytest.LogCaptureFixture) -> None:
    spool, back, metrics = FlakySpool(failures=5), [], Metrics()
    ledger = Unrecorded(spool=spool, on_recorded=back.append, metrics=metrics, first=0.01,
                        longest=0.02)
    done, pending = message("Q1"), message("Q2")
    assert not await ledger.record(done, done=True)
    assert not await ledger.record(pending, done=False)
    assert "Q1" in ledger and "Q2" in ledger
    assert metrics.registry.get_sample_value("relay_delivery_unrecorded_outcomes") == 2
    await until(lambda: len(ledger) == 0, timeout=5)
    assert spool.removed == ["Q1"] and spool.saved == ["Q2"]
    assert [m.queue_id for m in back] == ["Q2"]            # only pending mail goes back
    assert metrics.registry.get_sample_value("relay_delivery_unrecorded_outcomes") == 0
    assert await ledger.close() == []


async def test_stopping_names_what_is_still_unrecorded(caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    caplog.set_level(logging.ERROR, logger="relay.scheduler")
    spool = FlakySpool(failures=1000)
    ledger = Unrecorded(spool=spool, on_recorded=lambda m: None, first=10.0)
    assert await ledger.record(message("Q1"), done=True) is False
    assert await ledger.close() == ["Q1"]
    assert any("Q1: stopping with its delivery outcome unrecorded" in m
               for m in caplog.messages)
    assert spool.removed == []


async def test_a_written_outcome_never_waits() -> None:
    spool = FlakySpool(failures=0)
    ledger = Unrecorded(spool=spool, on_recorded=lambda m: None)
    assert await ledger.record(message("Q1"), done=False)
    assert len(ledger) == 0 and spool.saved == ["Q1"]
    assert await ledger.close() == []


async def test_only_outcomes_written_to_the_spool_are_settled() -> None:
    """The handover journal learns of each outcome once it is on disk, and of no other."""
    spool, settled = FlakySpool(failures=1), []
    ledger = Unrecorded(spool=spool, on_recorded=lambda m: None, first=0.01, longest=0.02,
                        settled=settled.append)
    assert await ledger.record(message("Q1"), done=True) is False
    assert settled == []                                   # refused: still handed
    assert await ledger.record(message("Q2"), done=False)
    assert settled == ["Q2"]
    await until(lambda: len(ledger) == 0, timeout=5)
    assert settled == ["Q2", "Q1"]                         # recorded by a later pass
    spool.failures = 1000
    assert await ledger.record(message("Q3"), done=False) is False
    assert await ledger.close() == ["Q3"]
    assert settled == ["Q2", "Q1"]                         # the next start counts Q3
