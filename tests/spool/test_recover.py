"""Start-up recovery: leftovers cleaned, damaged files moved aside, start-up goes on."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from relay.metrics import Metrics
from relay.spool.layout import IdGenerator
from relay.spool.records import RcptStatus
from relay.spool.store import Spool
from tests.spool.conftest import envelope

pytestmark = pytest.mark.fast

DATA = b"Subject: x\r\n\r\nbody\r\n"


async def _queue(root: Path, n: int) -> list[str]:
    sp = Spool(root)
    sp.recover()
    ids = [await sp.store(envelope(f"r{i}@example.net"), DATA) for i in range(n)]
    sp.close()
    return ids


def _moved(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "moved damaged file" in r.getMessage()]


async def test_tmp_leftovers_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "s"
    ids = await _queue(root, 2)
    (root / "tmp" / "01HALFWRITTEN0000").write_bytes(b"relay-spool/1 5 100\n{\"se")
    (root / "tmp" / "X.state").write_bytes(b"{")
    sp = Spool(root)
    assert [m.queue_id for m in sp.recover()] == ids
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "corrupt") == []


@pytest.mark.parametrize(("damage", "reason"), [
    (lambda b: b[: len(b) // 2], "truncated or overwritten"),
    (lambda b: b[:5], "header line is truncated"),
    (lambda b: b"", "file is empty"),
    (lambda b: b"\x00" * len(b), "not a relay spool file (starts with '\\x00"),
    (lambda b: b"EHLO garbage here\n" + b, "not a relay spool file"),
    (lambda b: b.replace(b'"recipients":[', b'"recipients":{', 1), "not valid JSON"),
])
async def test_a_damaged_message_is_moved_aside_and_the_rest_recovered(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, damage, reason: str,  # type: ignore[no-untyped-def]
) -> None:
    root = tmp_path / "s"
    good1, bad, good2 = await _queue(root, 3)
    path = root / "queue" / bad
    path.write_bytes(damage(path.read_bytes()))
    caplog.set_level(logging.INFO, logger="relay.spool")
    sp = Spool(root)
    assert [m.queue_id for m in sp.recover()] == [good1, good2]
    assert os.listdir(root / "corrupt") == [bad]
    assert sorted(os.listdir(root / "queue")) == [good1, good2]
    (line,) = _moved(caplog)
    assert str(path) in line and reason in line


async def test_damaged_message_takes_its_state_along(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    (qid,) = await _queue(root, 1)
    sp = Spool(root)
    msg = sp.recover()[0]
    msg.state.attempts = 3
    await sp.save_state(msg)
    sp.close()
    (root / "queue" / qid).write_bytes(b"garbage\n")
    metrics = Metrics()
    assert Spool(root, metrics=metrics).recover() == []
    assert sorted(os.listdir(root / "corrupt")) == [qid, qid + ".state"]
    assert len(_moved(caplog)) == 2
    assert metrics.registry.get_sample_value("relay_spool_quarantined_total") == 2


async def test_orphan_state_and_strangers_are_moved_aside(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    ids = await _queue(root, 1)
    orphan = IdGenerator().new() + ".state"
    (root / "queue" / orphan).write_bytes(b"{}")
    (root / "queue" / "notes.txt").write_text("hello")
    # a name already taken in corrupt/ is not overwritten
    (root / "corrupt" / "notes.txt").write_text("older")
    metrics = Metrics()
    assert [m.queue_id for m in Spool(root, metrics=metrics).recover()] == ids
    assert sorted(os.listdir(root / "corrupt")) == sorted([orphan, "notes.txt", "notes.txt.1"])
    assert metrics.registry.get_sample_value("relay_spool_quarantined_total") == 2
    assert (root / "corrupt" / "notes.txt").read_text() == "older"
    lines = _moved(caplog)
    assert any(orphan in line and "state file without its message" in line for line in lines)
    assert any("notes.txt" in line and "not a spool file name" in line for line in lines)


async def test_damaged_state_is_set_aside_and_the_message_starts_afresh(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    (qid,) = await _queue(root, 1)
    (root / "queue" / (qid + ".state")).write_bytes(b'{"v":1,"recipients":[')
    (msg,) = Spool(root).recover()
    assert msg.queue_id == qid
    assert msg.state.recipients[0].status is RcptStatus.PENDING and msg.state.attempts == 0
    assert os.listdir(root / "corrupt") == [qid + ".state"]
    (line,) = _moved(caplog)
    assert "message starts afresh" in line


async def test_state_of_another_envelope_is_damage(tmp_path: Path) -> None:
    root = tmp_path / "s"
    a, b = await _queue(root, 2)
    sp = Spool(root)
    msgs = sp.recover()
    msgs[0].state.attempts = 1
    await sp.save_state(msgs[0])
    sp.close()
    os.rename(root / "queue" / (a + ".state"), root / "queue" / (b + ".state"))
    assert [m.state.attempts for m in Spool(root).recover()] == [0, 0]
    assert os.listdir(root / "corrupt") == [b + ".state"]


async def test_scan_is_read_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "s"
    good, bad = await _queue(root, 2)
    (root / "queue" / bad).write_bytes(b"junk")
    (root / "tmp" / "leftover").write_bytes(b"x")
    sp = Spool(root)
    assert [m.queue_id for m in sp.scan()] == [good]
    assert sp.queue_ids() == [good]
    assert sorted(os.listdir(root / "queue")) == sorted([good, bad])
    assert os.listdir(root / "tmp") == ["leftover"] and os.listdir(root / "corrupt") == []
    assert any("skipping damaged file" in r.getMessage() for r in caplog.records)
