"""The scheduler and the handover journal: each attempt that reached the provider's data
is written down before it is sent and crossed out once its outcome is in the spool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from relay.spool.handovers import FILE, Handovers, read_journal
from tests.delivery.helpers import BODY, upstream
from tests.fakes.recording_upstream import RecordingUpstream
from tests.scheduler.rig import Rig, until

CASES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("delivered", {}, ["H", "S"]),
    ("deferred after the data, then delivered", {"script": {"DATA": ["451 4.3.0 later"]}},
     ["H", "S", "H", "S"]),
    ("reply lost after the data, then delivered", {"script": {"DATA": ["HANGUP"]}},
     ["H", "S", "H", "S"]),
    ("bounced at RCPT: never handed", {"rcpt_script": {"bob@example.net": ["550 5.1.1 no"]}},
     []),
]


@pytest.mark.parametrize(("script", "lines"), [(s, w) for _, s, w in CASES],
                         ids=[name for name, _, _ in CASES])
async def test_every_handover_is_settled_once_its_outcome_is_recorded(
        script: dict[str, Any], lines: list[str], rigs: list[Rig],
        peers: list[RecordingUpstream], tmp_path: Path) -> None:
    peer = RecordingUpstream(**script)
    await peer.start(0)
    peers.append(peer)
    journal = Handovers(tmp_path / FILE)
    r = Rig(tmp_path, upstream(peer.port), handovers=journal)
    rigs.append(r)
    await r.start()
    qid = await r.send(BODY)
    await r.drained()
    await until(lambda: not r.scheduler.in_flight(qid))
    journal.close()
    written = [line for line in (tmp_path / FILE).read_text().splitlines()
               if line.split()[1] == qid]             # not its bounce's (a message of its own)
    assert written == [f"{kind} {qid}" + (" up" if kind == "H" else "") for kind in lines]
    assert read_journal(tmp_path / FILE) == {}
