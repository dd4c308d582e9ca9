"""kill -9 at random instants: every acknowledged message survives, nothing is damaged."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

from relay.spool.store import Spool

WRITER = Path(__file__).with_name("crash_writer.py")
ROUNDS = 30


def _run_and_kill(root: Path, seed: int, rng: random.Random) -> list[tuple[str, str]]:
    """Start the writer, kill -9 it at a random instant; the events it completed."""
    proc = subprocess.Popen([sys.executable, str(WRITER), str(root), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=Path(__file__).parents[2])
    assert proc.stdout is not None
    lines: list[bytes] = []
    ready = threading.Event()
    enough = threading.Event()
    target = rng.randrange(0, 120)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line == b"READY\n":
                ready.set()
            if len(lines) > target:
                enough.set()
        ready.set()
        enough.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert ready.wait(30), "writer did not start"
        enough.wait(10)                     # events done so far: up to ~120
        time.sleep(rng.random() * 0.01)     # then land somewhere inside the next operation
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait(10)
    reader.join(10)
    events = []
    for line in lines:
        if line.endswith(b"\n") and line[:2] in (b"S ", b"T ", b"D ", b"R "):
            kind, qid = line.decode().split()
            events.append((kind, qid))
    return events


@pytest.mark.slow
def test_kill_9_never_loses_an_acknowledged_message(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "spool"
    rng = random.Random(os.getpid())
    stored: set[str] = set()
    removed: set[str] = set()
    removing: set[str] = set()              # remove() begun: gone or not, both are fine
    caplog.set_level(logging.INFO, logger="relay.spool")
    total = interrupted = 0
    for rnd in range(ROUNDS):
        events = _run_and_kill(root, rng.randrange(1 << 30), rng)
        total += len(events)
        interrupted += len(os.listdir(root / "tmp"))
        for kind, qid in events:
            if kind == "S":
                stored.add(qid)
            elif kind == "D":
                removing.add(qid)
            elif kind == "R":
                removed.add(qid)
        spool = Spool(root)
        spool.lock()                        # the dead writer's lock is gone
        recovered = {m.queue_id: m for m in spool.recover()}
        missing = stored - removing - set(recovered)
        assert not missing, f"round {rnd}: acknowledged messages lost: {sorted(missing)}"
        resurrected = removed & set(recovered)
        assert not resurrected, f"round {rnd}: removed messages came back: {resurrected}"
        assert os.listdir(root / "corrupt") == [], f"round {rnd}: damaged files"
        assert os.listdir(root / "tmp") == []
        for qid, msg in recovered.items():
            data = (root / "queue" / qid).read_bytes()[-msg.size:]
            assert msg.envelope.sender == f"crc{zlib.crc32(data)}@example.com", qid
        spool.close()
        stored -= removing - set(recovered)     # an interrupted remove() that did finish
        removing -= set(recovered)              # ... or did not: queued like any other
    moved = [r for r in caplog.records if "damaged" in r.getMessage()]
    assert moved == []
    assert total > ROUNDS                      # the kills did land amid real work,
    assert interrupted > 0                     # some of them halfway through a write
