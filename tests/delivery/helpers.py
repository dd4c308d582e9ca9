"""Builders shared by the delivery and scheduler tests."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from relay.config.schema import UpstreamConfig
from relay.envelope import Envelope
from relay.metrics import Metrics
from relay.outbound.attempt import Deliverer
from relay.spool.records import QueuedMessage, QueueState, Recipient
from relay.transports.direct import DirectTransport
from tests.fakes.recording_upstream import RecordingUpstream

BODY = (b"From: Alice <alice@example.com>\r\nTo: bob@example.net\r\n"
        b"Subject: hello\r\nMessage-ID: <m1@example.com>\r\n\r\n"
        b"Hi Bob,\r\n.leading dot line\r\nbye\r\n")


def upstream(port: int, **kw: Any) -> UpstreamConfig:
    base = UpstreamConfig(name="up", protocol="smtp", host="127.0.0.1", port=port, tls="none",
                          connect_timeout=5.0, command_timeout=10.0, data_timeout=10.0)
    return replace(base, **kw)


def message(qid: str = "Q1", sender: str = "alice@example.com",
            rcpts: tuple[str, ...] = ("bob@example.net",), **env: Any) -> QueuedMessage:
    envelope = Envelope(sender=sender, recipients=rcpts, received_at=time.time(), **env)
    return QueuedMessage(queue_id=qid, envelope=envelope,
                         state=QueueState(recipients=[Recipient(r) for r in rcpts]),
                         size=len(BODY))


def deliverer(*ups: UpstreamConfig, **kw: Any) -> Deliverer:
    kw.setdefault("hostname", "relay.test")
    kw.setdefault("suspend_for", 0.0)      # tests of the fail-fast window set their own
    return Deliverer(upstreams=ups, transport_for=lambda _u: DirectTransport(), **kw)


async def start(started: list[RecordingUpstream], **kw: Any) -> RecordingUpstream:
    """Start a recording upstream that the ``started`` fixture stops after the test."""
    up = RecordingUpstream(**kw)
    await up.start()
    started.append(up)
    return up


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0
