"""Where couriers hand a message over: the journal line is written at the point of no return.

SMTP: after the provider's 354 and before the first byte of the message; never for an
attempt that ends before it. Outbox: before the file appears.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.spool.handovers import FILE, Handovers
from tests.delivery.helpers import BODY, deliverer, message, start, upstream
from tests.fakes.recording_upstream import RecordingUpstream


def reached(peer: RecordingUpstream) -> bytes:
    """What relay has sent the upstream so far: what it read, and what waits in its socket
    (relay writes without an await in between, so that is where a write just made is)."""
    transport = peer._protocols[-1].transport
    assert transport is not None
    dup = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
    try:                                     # a copy of the descriptor: peek, never read
        waiting = dup.recv(1 << 20, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        waiting = b""
    finally:
        dup.close()
    return bytes(peer.raw[-1]) + waiting


class Spy(Handovers):
    """A journal that notes, at each handover, what ``seen()`` says then."""

    def __init__(self, path: Path, seen: Any) -> None:
        super().__init__(path)
        self._seen, self.at_handover = seen, []

    def handed(self, queue_id: str, upstream: str) -> None:
        self.at_handover.append(self._seen())
        super().handed(queue_id, upstream)


CASES: list[tuple[str, dict[str, Any], int]] = [
    ("delivered", {}, 1),
    ("refused after the data", {"script": {"DATA": ["554 5.7.1 looks like spam"]}}, 1),
    ("reply lost after the data", {"script": {"DATA": ["HANGUP"]}}, 1),
    ("refused at MAIL", {"script": {"MAIL": ["550 5.7.1 not you"]}}, 0),
    ("session lost at MAIL", {"script": {"MAIL": ["HANGUP"]}}, 0),
    ("every recipient refused", {"rcpt_script": {"bob@example.net": ["550 5.1.1 no"]}}, 0),
]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
@pytest.mark.parametrize(("script", "handed"), [(s, h) for _, s, h in CASES],
                         ids=[name for name, _, _ in CASES])
async def test_an_smtp_attempt_is_handed_over_between_the_354_and_the_message(
        script: dict[str, Any], handed: int, pipelining: bool,
        started: list[RecordingUpstream], tmp_path: Path) -> None:
    peer = await start(started, pipelining=pipelining, **script)
    journal = Spy(tmp_path / FILE, lambda: reached(peer))
    d = deliverer(upstream(peer.port), handovers=journal)
    await d.deliver("up", message(), BODY, ["bob@example.net"])
    await d.close()
    journal.close()
    assert (tmp_path / FILE).read_bytes() == b"H Q1 up\n" * handed
    for sent in journal.at_handover:         # the provider was ready, and had nothing yet
        assert sent.endswith(b"DATA\r\n") and b"Subject: hello" not in sent, sent


async def test_an_outbox_delivery_is_handed_over_before_the_file_appears(
        tmp_path: Path) -> None:
    out = tmp_path / "outbox"
    journal = Spy(tmp_path / FILE, lambda: sorted(p.name for p in out.glob("*")))
    ob = replace(upstream(0, name="box", protocol="outbox"), path=out)
    d = deliverer(ob, handovers=journal)
    res = await d.deliver("box", message(), BODY, ["bob@example.net"])
    assert res["bob@example.net"].ok
    journal.close()
    assert journal.at_handover == [[]]
    assert (tmp_path / FILE).read_bytes() == b"H Q1 box\n"
    assert [p.name for p in out.iterdir()] == ["Q1.eml"]
