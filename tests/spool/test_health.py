"""Spool health: the reserve decides at MAIL, a read-only or failing spool is not ready."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.spool.health import SpoolHealth
from relay.spool.store import Spool
from tests.peers.tmpfs import fill, read_only, tmpfs
from tests.spool.conftest import envelope


def writable(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("relay_spool_writable")


@pytest.mark.fast
async def test_the_reserve_and_the_announced_size_decide(tmp_path: Path) -> None:
    metrics = Metrics()
    health = SpoolHealth(tmp_path, reserve=0, metrics=metrics, ttl=0.0)
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    assert await health.check() is None
    assert await health.refresh() is None and writable(metrics) == 1
    big = await health.check(2 * free)                   # SIZE= more than the disk holds
    assert big is not None and big.full and "MB more" in big.text
    health.configure(reserve=2 * free)
    short = await health.check()
    assert short is not None and short.full
    assert f"{tmp_path}" in short.text and "spool_reserve" in short.text
    problem = await health.refresh()
    assert problem is not None and problem.startswith("spool not writable: ")
    assert writable(metrics) == 0
    assert metrics.registry.get_sample_value("relay_spool_free_bytes") == pytest.approx(
        free, rel=0.05)
    health.configure(reserve=0)
    assert await health.refresh() is None and writable(metrics) == 1


@pytest.mark.fast
async def test_a_failed_write_is_not_ready_until_a_probe_write_succeeds(tmp_path: Path
                                                                        ) -> None:
    metrics = Metrics()
    sp = Spool(tmp_path / "spool", metrics=metrics)
    sp.recover()
    shutil.rmtree(sp.tmp)
    sp.tmp.write_text("a file where the tmp/ directory belongs\n")   # every write fails
    with pytest.raises(SpoolError) as err:
        await sp.store(envelope(), b"Subject: x\r\n\r\nx\r\n")
    assert not err.value.disk_full
    assert sp.health.problem() == (f"spool not writable: cannot create a spool file: "
                                   f"{os.strerror(20)}")        # ENOTDIR
    assert await sp.health.refresh() is not None             # the probe write fails too
    assert writable(metrics) == 0
    sp.tmp.unlink()
    sp.tmp.mkdir()
    assert await sp.health.refresh() is None
    assert writable(metrics) == 1
    assert list(sp.tmp.iterdir()) == []                       # the probe cleaned up
    assert await sp.store(envelope(), b"Subject: y\r\n\r\ny\r\n")
    sp.close()


async def test_a_read_only_spool_is_not_full_but_not_writable(tmp_path: Path) -> None:
    metrics = Metrics()
    with tmpfs(tmp_path / "fs", "1m") as fs:
        sp = Spool(fs / "spool", metrics=metrics)
        sp.recover()
        qid = await sp.store(envelope(), b"Subject: x\r\n\r\nx\r\n")
        read_only(fs)
        try:
            shortage = await sp.health.check()
            assert shortage is not None and not shortage.full      # 451 4.3.0, not 452
            assert "read-only" in shortage.text
            assert "read-only" in (await sp.health.refresh() or "")
            assert writable(metrics) == 0
            with pytest.raises(SpoolError):
                await sp.remove(qid)                          # nothing can be recorded
        finally:
            read_only(fs, on=False)
        assert await sp.health.check() is None               # at once: no stale cache
        assert await sp.health.refresh() is None
        assert writable(metrics) == 1
        await sp.remove(qid)
        sp.close()


async def test_below_the_reserve_is_full_and_freeing_space_makes_it_ready(tmp_path: Path
                                                                          ) -> None:
    metrics = Metrics()
    with tmpfs(tmp_path / "fs", "2m") as fs:
        sp = Spool(fs / "spool", metrics=metrics, reserve=512 * 1024)
        sp.recover()
        assert await sp.health.refresh() is None
        filler = fs / "filler"
        fill(filler, leave=256 * 1024)
        problem = await sp.health.refresh()
        assert problem is not None and "spool_reserve = 0.5 MB" in problem
        shortage = await sp.health.check()
        assert shortage is not None and shortage.full
        filler.unlink()
        assert await sp.health.check(100_000) is None     # at once: no stale cache
        assert await sp.health.refresh() is None
        sp.close()
