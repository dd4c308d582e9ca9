"""A crash between handing a message over and recording the reply, at the exact point.

The spool is laid out as ``kill -9`` leaves it right after the provider took a message:
the message still queued and its ``H`` line in ``<spool>/handovers``, no ``S`` line. The
real relay starts on it: it counts the possible duplicate once
(``relay_delivery_outcome_unknown_total``), says so in one warning, and still delivers the
message. A message already removed from the spool had its outcome recorded: not counted.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from relay.envelope import Envelope
from relay.spool.handovers import FILE, read_journal
from relay.spool.store import Spool
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Sink, config, running_relay, sample, scrape, subjects

WARNING = "relay stopped after handing it to sink and before recording the reply"
ORPHAN = "1K00000000000ZZZZZ"            # handed by the previous process, since removed


async def store(spool: Path, subject: str) -> str:
    sp = Spool(spool, fsync=False)
    sp.recover()
    env = Envelope(sender="agent@example.com", recipients=("customer@example.net",),
                   received_at=time.time(), listener="platform")
    try:
        return await sp.store(env, (f"From: agent@example.com\r\nTo: customer@example.net\r\n"
                                    f"Subject: {subject}\r\n\r\nhi\r\n").encode())
    finally:
        sp.close()


@pytest.mark.parametrize(("left", "counted"), [("queued", 1), ("removed", 0)])
def test_a_message_handed_over_when_relay_died_is_counted_once_if_still_queued(
        left: str, counted: int, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    qid = asyncio.run(store(spool, "handed-over"))
    handed = qid if left == "queued" else ORPHAN
    other = asyncio.run(store(spool, "settled"))      # handed and recorded as deferred
    (spool / FILE).write_bytes(f"H {handed} sink\nH {other} sink\nS {other}\n"
                               f"H {qid[:5]}".encode())     # and a torn last line
    sink = Sink(tmp_path).start()
    port, mport = free_port(), free_port()
    try:
        with running_relay(tmp_path, config(spool=spool, listen=port, sink=sink.port,
                                            metrics=mport), port) as relay:
            assert sample(scrape(mport), "relay_delivery_outcome_unknown_total",
                          upstream="sink") == counted
            wait_until(lambda: len(sink.messages()) == 2)
            wait_until(lambda: not (spool / "queue").exists()
                       or not any((spool / "queue").iterdir()))
            assert sample(scrape(mport), "relay_delivery_outcome_unknown_total",
                          upstream="sink") == counted
            log = relay.log_text()
        assert subjects(sink) == [b"handed-over", b"settled"]
        warnings = [line for line in log.splitlines() if WARNING in line]
        assert len(warnings) == counted, log
        assert all(qid in line for line in warnings), warnings
        assert ORPHAN not in log and other not in "".join(warnings)
        assert "Traceback" not in log, log
        assert read_journal(spool / FILE) == {}             # the new process settled both
    finally:
        sink.stop()
