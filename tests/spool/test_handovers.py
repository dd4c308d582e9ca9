"""The handover journal on its own: what one process writes, what the next start counts."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.metrics import Metrics
from relay.spool import handovers
from relay.spool.handovers import FILE, Handovers, read_journal, take_over

pytestmark = pytest.mark.fast

A, B, C = "0000000000000AAAAA", "0000000000000BBBBB", "0000000000000CCCCC"
WARNING = "relay stopped after handing it to"


def unknown(metrics: Metrics, upstream: str) -> float:
    value = metrics.registry.get_sample_value("relay_delivery_outcome_unknown_total",
                                              {"upstream": upstream})
    return value or 0.0


@dataclass(frozen=True)
class Run:
    name: str
    steps: tuple[tuple[str, ...], ...]     # ("H", qid, upstream) | ("S", qid)
    left: dict[str, set[str]]              # what the next start finds handed


RUNS = [
    Run("handed then settled leaves nothing", (("H", A, "up"), ("S", A)), {}),
    Run("handed and never settled is left", (("H", A, "up"), ("H", B, "up"), ("S", B)),
        {A: {"up"}}),
    Run("every upstream of a message is kept", (("H", A, "up"), ("H", A, "partner")),
        {A: {"up", "partner"}}),
    Run("one settle covers every upstream", (("H", A, "up"), ("H", A, "partner"), ("S", A)),
        {}),
    Run("handed again after a settle is left", (("H", A, "up"), ("S", A), ("H", A, "up")),
        {A: {"up"}}),
    Run("settled for an id never handed", (("S", C),), {}),
]


@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_what_a_process_leaves_is_what_the_next_start_reads(run: Run, tmp_path: Path) -> None:
    journal = Handovers(tmp_path / FILE)
    for step in run.steps:
        if step[0] == "H":
            journal.handed(step[1], step[2])
        else:
            journal.settled(step[1])
    journal.close()                        # or kill -9: every write is already in the file
    assert read_journal(tmp_path / FILE) == run.left


READS = [
    ("empty", b"", {}),
    ("torn last line", b"H " + A.encode() + b" up\nH " + B.encode() + b" u", {A: {"up"}}),
    ("torn settle", b"H " + A.encode() + b" up\nS " + A.encode()[:5], {A: {"up"}}),
    ("garbage lines", b"\x00\xff junk\n\nH\nH " + A.encode() + b"\nX 1 2\nH " + B.encode()
     + b" up extra\nH " + C.encode() + b" up\n", {C: {"up"}}),
    ("not ascii", b"H \xc3\xa9 up\nH " + A.encode() + b" up\n", {"\ufffd\ufffd": {"up"},
                                                              A: {"up"}}),
    ("settle before hand", b"S " + A.encode() + b"\nH " + A.encode() + b" up\n", {A: {"up"}}),
]


@pytest.mark.parametrize(("raw", "left"), [(raw, left) for _, raw, left in READS],
                         ids=[name for name, _, _ in READS])
def test_torn_lines_and_garbage_are_skipped(raw: bytes, left: dict[str, set[str]],
                                             tmp_path: Path) -> None:
    (tmp_path / FILE).write_bytes(raw)
    assert read_journal(tmp_path / FILE) == left


def test_a_settle_for_a_message_never_handed_writes_nothing(tmp_path: Path) -> None:
    journal = Handovers(tmp_path / FILE)
    journal.handed(A, "up")
    size = (tmp_path / FILE).stat().st_size
    journal.settled(B)
    journal.settled(B)
    assert (tmp_path / FILE).stat().st_size == size
    journal.settled(A)
    journal.settled(A)                     # settled once: the second writes nothing
    assert (tmp_path / FILE).read_bytes() == f"H {A} up\nS {A}\n".encode()


def test_compaction_keeps_only_what_is_still_handed(tmp_path: Path) -> None:
    journal = Handovers(tmp_path / FILE, compact_after=4096)
    journal.handed(A, "up")
    biggest = 0
    for i in range(400):                   # ~13 KB written: three rewrites at least
        qid = f"{i:018d}"
        journal.handed(qid, "up")
        journal.settled(qid)
        biggest = max(biggest, (tmp_path / FILE).stat().st_size)
    assert biggest <= 4096 + 100
    assert read_journal(tmp_path / FILE) == {A: {"up"}}
    journal.handed(B, "partner")           # the rewritten file is the one appended to
    journal.close()
    assert read_journal(tmp_path / FILE) == {A: {"up"}, B: {"partner"}}
    assert (tmp_path / FILE).stat().st_size < 4096
    assert not (tmp_path / (FILE + ".tmp")).exists()


def test_the_next_start_counts_each_left_message_still_queued_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.spool")
    journal = Handovers(tmp_path / FILE)
    journal.handed(A, "up")
    journal.handed(A, "partner")
    journal.handed(A, "up")                # a retry in the same process: still one
    journal.handed(B, "up")                # removed from the spool: its outcome was recorded
    journal.handed(C, "up")
    journal.settled(C)
    # kill -9 here: no close()
    metrics = Metrics()
    fresh = take_over(tmp_path, {A, C}, metrics)
    assert (unknown(metrics, "up"), unknown(metrics, "partner")) == (1, 1)
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert warnings == [f"{A}: relay stopped after handing it to partner and up and before "
                        "recording the reply; it stays queued and is sent again, so the "
                        "recipient may get it twice (counted in "
                        "relay_delivery_outcome_unknown_total)"]
    assert read_journal(tmp_path / FILE) == {}            # a fresh journal
    fresh.close()
    take_over(tmp_path, {A, C}, metrics).close()          # counted once, not at every start
    assert unknown(metrics, "up") == 1


def test_an_unreadable_journal_is_logged_and_the_start_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / FILE).mkdir()              # not a file: cannot be read nor replaced
    metrics = Metrics()
    journal = take_over(tmp_path, {A}, metrics)
    journal.handed(A, "up")                # no file to write to: delivery goes on
    journal.settled(A)
    journal.close()
    assert unknown(metrics, "up") == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("cannot read the handover journal" in m for m in errors), errors
    assert any("cannot rewrite it" in m for m in errors), errors


class Writes:
    """Each write the journal makes, as bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[bytes] = []
        real = handovers.write_all

        def spy(fd: int, *parts: bytes) -> None:
            self.made.append(b"".join(parts))
            real(fd, *parts)

        monkeypatch.setattr(handovers, "write_all", spy)


async def test_the_settlements_of_one_turn_of_the_loop_go_in_one_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Handovers(tmp_path / FILE)
    for qid in (A, B, C):
        journal.handed(qid, "up")
    writes = Writes(monkeypatch)
    for qid in (A, B, C):
        journal.settled(qid)
    assert writes.made == []                  # not yet: the turn goes on
    await asyncio.sleep(0)
    assert writes.made == [f"S {A}\nS {B}\nS {C}\n".encode()]
    assert read_journal(tmp_path / FILE) == {}
    journal.close()


async def test_a_handover_after_a_pending_settlement_keeps_the_order_of_events(
        tmp_path: Path) -> None:
    journal = Handovers(tmp_path / FILE)
    journal.handed(A, "up")
    journal.settled(A)                        # a deferred attempt's outcome recorded ...
    journal.handed(A, "up")                   # ... and the retry handed over, same turn
    assert read_journal(tmp_path / FILE) == {A: {"up"}}
    await asyncio.sleep(0)
    assert read_journal(tmp_path / FILE) == {A: {"up"}}
    journal.close()


async def test_closing_writes_the_settlements_still_pending(tmp_path: Path) -> None:
    journal = Handovers(tmp_path / FILE)
    journal.handed(A, "up")
    journal.handed(B, "up")
    journal.settled(A)
    journal.close()
    assert read_journal(tmp_path / FILE) == {B: {"up"}}
    await asyncio.sleep(0)                    # the scheduled write finds nothing to do
    assert read_journal(tmp_path / FILE) == {B: {"up"}}
