"""A reply that never comes after the data: the outcome is unknown, retried, and counted."""

from __future__ import annotations

from relay.metrics import Metrics
from tests.delivery.helpers import BODY, deliverer, message, sample, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream


async def test_hangup_after_the_data_is_an_unknown_outcome(
        started: list[RecordingUpstream]) -> None:
    peer = await start(started, script={"DATA": ["HANGUP"]})
    metrics = Metrics()
    d = deliverer(upstream(peer.port), metrics=metrics)
    first = await d.deliver("up", message(), BODY, ["bob@example.net"])
    res = first["bob@example.net"]
    assert not res.ok and not res.permanent and res.reason == "disconnected"
    assert "the provider may have accepted it" in res.reply
    assert len(peer.received) == 1                 # it did: the retry below duplicates it
    assert sample(metrics, "relay_delivery_outcome_unknown_total", upstream="up") == 1
    again = await d.deliver("up", message(), BODY, ["bob@example.net"])
    assert again["bob@example.net"].ok
    assert len(peer.received) == 2
    assert sample(metrics, "relay_delivery_outcome_unknown_total", upstream="up") == 1
    await d.close()


async def test_no_reply_in_time_after_the_data_is_an_unknown_outcome(
        started: list[RecordingUpstream]) -> None:
    peer = await start(started, delays={"DATA": 1.0})
    metrics = Metrics()
    d = deliverer(upstream(peer.port, data_timeout=0.2), metrics=metrics)
    res = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
    assert res.reason == "timeout" and not res.permanent
    assert sample(metrics, "relay_delivery_outcome_unknown_total", upstream="up") == 1
    await d.close()


async def test_failures_before_the_data_is_sent_are_known_outcomes(
        started: list[RecordingUpstream]) -> None:
    """Hang-ups at MAIL and a refused DATA: nothing was delivered, nothing is counted."""
    peer = await start(started, script={"MAIL": ["HANGUP"], "DATA": ["451 4.3.0 later"]})
    metrics = Metrics()
    d = deliverer(upstream(peer.port), metrics=metrics)
    for _ in range(2):
        res = (await d.deliver("up", message(), BODY, ["bob@example.net"]))["bob@example.net"]
        assert not res.ok and not res.permanent
    assert peer.received == []
    assert sample(metrics, "relay_delivery_outcome_unknown_total", upstream="up") == 0
    await d.close()
