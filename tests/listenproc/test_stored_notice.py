"""A listener process's "stored" notice carries the message's bytes only while the main
process keeps up with reading them (relay.app.child)."""

from __future__ import annotations

import pytest

from relay.app.child import INLINE_BACKLOG, INLINE_DATA, ListenerProcess
from relay.envelope import Envelope
from relay.spool.layout import fresh_state
from relay.spool.records import QueuedMessage

pytestmark = pytest.mark.fast


class _Channel:
    def __init__(self, backlog: int) -> None:
        self.backlog = backlog


class _Rpc:
    def __init__(self, backlog: int) -> None:
        self.channel = _Channel(backlog)
        self.sent: list[tuple[str, object]] = []

    def notify(self, kind: str, payload: object = None, *, now: bool = False) -> None:
        self.sent.append((kind, payload))


@pytest.mark.parametrize(("size", "backlog", "inline"), [
    (1_000, 0, True),                                   # the usual case
    (100_000, INLINE_BACKLOG - 100_000, True),          # just fits
    (100_000, INLINE_BACKLOG - 99_999, False),          # the main process is behind
    (INLINE_DATA, 0, True),
    (INLINE_DATA + 1, 0, False),                        # too large to ride along at all
])
def test_the_bytes_ride_along_only_within_the_backlog(size: int, backlog: int,
                                                      inline: bool) -> None:
    process = ListenerProcess.__new__(ListenerProcess)  # only _stored and its rpc
    rpc = _Rpc(backlog)
    process.rpc = rpc  # type: ignore[assignment]
    envelope = Envelope(sender="a@example.com", recipients=("b@example.net",),
                        received_at=0.0, trusted=True)
    msg = QueuedMessage(queue_id="4QbX9k2ZJ7Tq", envelope=envelope,
                        state=fresh_state(envelope), size=size)
    data = b"x" * size
    process._stored(msg, data)
    assert rpc.sent == [("stored", (msg, data if inline else None))]
