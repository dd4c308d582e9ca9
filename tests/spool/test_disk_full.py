"""A full disk: store() says so (452-worthy), and nothing half-written remains."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.spool.store import Spool
from tests.spool.conftest import envelope


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs",
                           str(mnt)], capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test ({done.stderr.strip()}): "
                    "run the tests as root (or with CAP_SYS_ADMIN)")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def _fill(path: Path) -> None:
    """Take every free block of the filesystem."""
    with contextlib.suppress(OSError), open(path, "wb", buffering=0) as f:
        for _ in range(1000):
            f.write(b"\0" * 4096)


def _spooled_files(sp: Spool) -> tuple[list[str], list[str]]:
    return sorted(os.listdir(sp.queue)), os.listdir(sp.tmp)


async def test_a_message_larger_than_the_free_space(tiny_fs: Path) -> None:
    sp = Spool(tiny_fs / "spool")
    sp.recover()
    with pytest.raises(SpoolError) as err:
        await sp.store(envelope(), b"x" * 300_000)
    assert err.value.disk_full
    assert "is full" in str(err.value) and "free space" in err.value.hint
    assert _spooled_files(sp) == ([], [])
    assert sp.queue_ids() == []
    sp.close()


async def test_filling_the_disk_keeps_every_stored_message_whole(tiny_fs: Path) -> None:
    sp = Spool(tiny_fs / "spool")
    sp.recover()
    stored: dict[str, bytes] = {}
    failures = 0
    for i in range(200):                        # bounded: 256 KiB holds far fewer than this
        data = b"Subject: %d\r\n\r\n" % i + os.urandom(7_000 + 97 * i).translate(None, b"\r\n")
        try:
            stored[await sp.store(envelope(), data)] = data
        except SpoolError as exc:
            assert exc.disk_full, exc
            failures += 1
            if failures >= 3:
                break
    assert stored and failures == 3
    queue, tmp = _spooled_files(sp)
    assert queue == sorted(stored) and tmp == []

    # State files hit the same wall: refused whole, the old state stays.
    filler = tiny_fs / "spool" / "filler"
    _fill(filler)
    qid = next(iter(stored))
    msg = sp.load(qid)
    msg.state.recipients[0].last_reply = "x" * 20_000
    with pytest.raises(SpoolError) as err:
        await sp.save_state(msg)
    assert err.value.disk_full
    assert _spooled_files(sp) == (queue, [])
    assert sp.load(qid).state.recipients[0].last_reply == ""
    filler.unlink()

    # A fresh start finds exactly what was acknowledged, undamaged.
    sp.close()
    again = Spool(tiny_fs / "spool")
    recovered = again.recover()
    assert [m.queue_id for m in recovered] == sorted(stored)
    assert os.listdir(again.corrupt) == []
    for m in recovered:
        assert await again.read_message(m.queue_id) == stored[m.queue_id]

    # Space freed: stores work again.
    for m in recovered[:5]:
        await again.remove(m.queue_id)
    assert await again.read_message(await again.store(envelope(), b"ok\r\n")) == b"ok\r\n"
    again.close()
