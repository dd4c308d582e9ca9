"""Admission's bookkeeping of connections, with a stand-in scheduler (pure: no peers)."""

from __future__ import annotations

import pytest

from relay.config.loader import load_config
from relay.outbound.admission import Admission, Groups, Plan
from relay.outbound.attempt import Deliverer
from relay.outbound.courier import RcptResult
from relay.outbound.lines import Line
from relay.outbound.pacing import Ticket
from relay.outbound.throttle_table import ThrottleTable
from relay.spool.records import QueuedMessage
from tests.delivery.helpers import deliverer, message, upstream
from tests.scheduler.test_pacing import CONF

pytestmark = pytest.mark.fast


class Owner:
    """Stands in for the scheduler: every message is to be sent now to upstream "up"."""

    def __init__(self, d: Deliverer, msgs: dict[str, QueuedMessage]) -> None:
        self.d, self.msgs = d, msgs
        self.launched: list[str] = []

    def plan(self, queue_id: str) -> Plan | None:
        msg = self.msgs.get(queue_id)
        if msg is None or queue_id in self.launched:
            return None
        return msg, {"up": list(msg.envelope.recipients)}, {}, self.d

    def launch(self, msg: QueuedMessage, groups: Groups, unrouted: dict[str, RcptResult],
               deliverer: Deliverer, line: Line | None, ticket: Ticket | None) -> None:
        self.launched.append(msg.queue_id)


async def test_a_line_handed_a_connection_gives_it_back_when_it_must_wait() -> None:
    d = deliverer(upstream(25, max_connections=1))
    msgs = {q: message(q) for q in ("Q1", "Q2")}
    owner = Owner(d, msgs)
    gate = Admission(owner, throttles=ThrottleTable(
        load_config(CONF / "relay.toml").throttle_replies))
    line = Line("up", "alice@example.com", members={"Q1": 0.0, "Q2": 0.0})
    slots = gate.book.slots
    assert slots.take("up", 1, Line("up", "other@example.com"))    # another holds it
    assert not slots.take("up", 1, line)                           # alice queues ...
    slots.give_back("up")                                          # ... and is handed it
    assert line.granted["up"] == 1 and slots.busy["up"] == 1
    throttle = gate.throttles.throttle("421 4.7.0 Try again later, closing connection")
    assert throttle is not None
    gate.pauses.pause("up", "alice@example.com", throttle)         # the provider paused it
    wait = await gate.admit(line, "Q1")
    assert wait is not None and wait.reason == "paused"
    assert line.granted["up"] == 0 and "up" not in slots.busy      # free for the others
    assert owner.launched == []
    await d.close()
