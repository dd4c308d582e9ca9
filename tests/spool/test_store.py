"""The spool's write and read paths, index, stats and lock."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.control.queue import QueueManager
from relay.errors import BareLineEndingError, SpoolError
from relay.metrics import Metrics
from relay.spool.diskio import write_all
from relay.spool.layout import is_queue_id
from relay.spool.records import QueuedMessage, RcptStatus
from relay.spool.store import Spool
from tests.spool.conftest import envelope

DATA = b"From: agent@example.com\r\nSubject: hello\r\n\r\nbody\r\n"


@pytest.mark.fast
async def test_store_writes_one_durable_file_and_nothing_else(spool: Spool) -> None:
    env = envelope("a@example.net", "b@example.net")
    qid = await spool.store(env, DATA)
    assert is_queue_id(qid)
    assert os.listdir(spool.queue) == [qid]          # one file: no state on the happy path
    assert os.listdir(spool.tmp) == []
    assert (spool.queue / qid).read_bytes().endswith(DATA)
    assert oct((spool.queue / qid).stat().st_mode & 0o777) == "0o600"
    assert await spool.read_message(qid) == DATA
    msg = spool.load(qid)
    assert msg.envelope == env and msg.size == len(DATA)
    assert [(r.address, r.status) for r in msg.state.recipients] == [
        ("a@example.net", RcptStatus.PENDING), ("b@example.net", RcptStatus.PENDING)]
    assert msg.state.next_attempt == 0 and not msg.state.held
    assert spool.queue_ids() == [qid] and qid in spool


@pytest.mark.fast
async def test_listeners_get_each_stored_message(spool: Spool) -> None:
    seen: list[QueuedMessage] = []
    spool.add_listener(seen.append)
    spool.add_listener(lambda m: 1 / 0)         # a failing listener does not fail store()
    qid = await spool.store(envelope(), DATA)
    assert [m.queue_id for m in seen] == [qid]
    assert seen[0].state.recipients[0].status is RcptStatus.PENDING


@pytest.mark.fast
async def test_concurrent_stores_get_distinct_ordered_ids(spool: Spool) -> None:
    ids = await asyncio.gather(*(spool.store(envelope(), DATA + b"%d" % i) for i in range(60)))
    assert len(set(ids)) == 60
    assert spool.queue_ids() == sorted(ids)
    for i, qid in enumerate(ids):
        assert await spool.read_message(qid) == DATA + b"%d" % i


@pytest.mark.fast
async def test_a_cancelled_store_still_completes_and_is_announced(spool: Spool) -> None:
    seen: list[str] = []
    announced = asyncio.Event()
    spool.add_listener(lambda m: (seen.append(m.queue_id), announced.set()))
    task = asyncio.ensure_future(spool.store(envelope(), b"x" * 5_000_000))
    await asyncio.sleep(0)                      # let it start writing, then cancel
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(announced.wait(), 10)      # the write finishes in its thread
    assert spool.queue_ids() == seen and os.listdir(spool.tmp) == []


@pytest.mark.fast
@pytest.mark.parametrize(("data", "kind"), [
    (b"Subject: hi\rBcc: victim@example.org\r\n\r\nbody\r\n", "CR"),
    (b"Subject: hi\nBcc: victim@example.org\r\n\r\nbody\r\n", "LF"),
    (b"Subject: x\r\n\r\nfirst\n.\nMAIL FROM:<e@evil.example>\r\n", "LF"),
    (b"Subject: x\r\n\r\nbody\r\n\r", "CR"),                 # at the very end
    (b"\nSubject: x\r\n\r\nbody\r\n", "LF"),                 # at the very start
    (b"Subject: x\r\n\r\nbody\n\r", "LF"),                    # LF CR is no pair
])
async def test_store_refuses_a_bare_cr_or_lf(spool: Spool, data: bytes, kind: str) -> None:
    """The spool holds CRLF messages only: delivery sends them without scanning again."""
    seen: list[QueuedMessage] = []
    spool.add_listener(seen.append)
    with pytest.raises(BareLineEndingError) as err:
        await spool.store(envelope(), data)
    assert err.value.kind == kind and isinstance(err.value, SpoolError)
    assert f"bare {kind}" in str(err.value)
    assert spool.queue_ids() == [] and seen == []
    assert os.listdir(spool.queue) == [] and os.listdir(spool.tmp) == []


@pytest.mark.fast
async def test_store_takes_a_callers_word_for_it(spool: Spool) -> None:
    """``crlf_checked=True``: the caller checked already (the SMTP accept pipeline, behind
    its DATA reader), so the spool does not scan the message a second time."""
    vouched = b"Subject: x\r\n\r\nbody\n"      # a lie, to show that nothing is scanned
    qid = await spool.store(envelope(), vouched, crlf_checked=True)
    assert await spool.read_message(qid) == vouched
    plain = await spool.store(envelope(), DATA)        # CRLF only: no vouch needed
    assert await spool.read_message(plain) == DATA


@pytest.mark.fast
async def test_state_is_saved_atomically_and_removed_before_the_message(spool: Spool) -> None:
    qid = await spool.store(envelope("a@example.net", "b@example.net"), DATA)
    msg = spool.load(qid)
    msg.state.recipients[0].status = RcptStatus.DELIVERED
    msg.state.recipients[1].last_reply = "451 4.3.0 busy"
    msg.state.attempts, msg.state.next_attempt = 1, time.time() + 600
    await spool.save_state(msg)
    assert sorted(os.listdir(spool.queue)) == [qid, qid + ".state"]
    assert os.listdir(spool.tmp) == []
    again = spool.load(qid)
    assert again.state == msg.state

    calls: list[str] = []
    real_unlink = os.unlink

    def spy(path: str | os.PathLike[str]) -> None:
        calls.append(os.path.basename(path))
        real_unlink(path)

    os.unlink = spy  # type: ignore[assignment]
    try:
        await spool.remove(qid)
    finally:
        os.unlink = real_unlink
    assert calls == [qid + ".state", qid]
    assert os.listdir(spool.queue) == [] and qid not in spool
    with pytest.raises(KeyError):
        spool.load(qid)
    with pytest.raises(KeyError):
        await spool.read_message(qid)
    with pytest.raises(KeyError):
        await spool.save_state(msg)             # never an orphan state file
    assert os.listdir(spool.queue) == []
    await spool.remove(qid)                     # idempotent


@pytest.mark.fast
@pytest.mark.parametrize("bad", ["../../etc/passwd", "..", "lock", "abc", ""])
async def test_ids_from_outside_are_validated(spool: Spool, bad: str) -> None:
    with pytest.raises(KeyError):
        spool.load(bad)
    with pytest.raises(KeyError):
        await spool.read_message(bad)
    with pytest.raises(KeyError):
        await spool.remove(bad)


@pytest.mark.fast
async def test_stats_and_metrics(spool: Spool) -> None:
    now = time.time()
    old = await spool.store(envelope(when=now - 300), DATA)
    deferred = await spool.store(envelope(when=now - 100), DATA)
    held = await spool.store(envelope(when=now - 50), DATA)
    await spool.store(envelope(when=now), DATA)
    msg = spool.load(deferred)
    msg.state.next_attempt = now + 60
    await spool.save_state(msg)
    msg = spool.load(held)
    msg.state.held = True
    await spool.save_state(msg)
    stats = spool.stats(now)
    assert stats.counts == {"active": 2, "deferred": 1, "held": 1}
    assert stats.oldest_received == pytest.approx(now - 300)
    assert spool.stats(now + 61).counts == {"active": 3, "deferred": 0, "held": 1}

    metrics = Metrics()
    sp = Spool(spool.root, metrics=metrics)
    assert len(sp.recover()) == 4               # the index is rebuilt from disk
    sp.update_metrics(now)
    value = metrics.registry.get_sample_value
    assert value("relay_queue_messages", {"state": "deferred"}) == 1
    assert value("relay_queue_messages", {"state": "held"}) == 1
    assert value("relay_queue_messages", {"state": "active"}) == 2
    assert value("relay_queue_oldest_message_age_seconds") == pytest.approx(300)
    await sp.remove(old)
    sp.update_metrics(now)
    assert value("relay_queue_oldest_message_age_seconds") == pytest.approx(100)
    await sp.remove(deferred)
    sp.update_metrics(now)      # the held message (50 s) is older than the last one (0 s)
    assert value("relay_queue_oldest_message_age_seconds") == pytest.approx(0, abs=1)
    sp.close()


@pytest.mark.fast
async def test_a_write_error_is_a_spool_error_and_leaves_nothing(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s")
    sp.recover()
    os.rmdir(sp.tmp)
    sp.tmp.write_text("not a directory")        # ENOTDIR on create
    with pytest.raises(SpoolError) as err:
        await sp.store(envelope(), DATA)
    assert not err.value.disk_full
    assert "cannot create a spool file" in str(err.value) and err.value.hint
    assert os.listdir(sp.queue) == [] and sp.queue_ids() == []
    sp.close()


@pytest.mark.fast
async def test_unwritable_spool_root_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    sp = Spool(tmp_path / "file" / "spool")
    with pytest.raises(SpoolError, match="cannot use the spool directory") as err:
        sp.recover()
    assert "[relay] spool" in err.value.hint


@pytest.mark.fast
async def test_fsync_off_still_stores(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s", fsync=False)
    qid = await sp.store(envelope(), DATA)
    assert await sp.read_message(qid) == DATA
    sp.close()


@pytest.mark.fast
def test_lock_is_exclusive_and_visible(tmp_path: Path) -> None:
    a, b = Spool(tmp_path / "s"), Spool(tmp_path / "s")
    assert not a.is_locked_by_other()
    lock = a.lock()
    assert lock.held and not a.is_locked_by_other() and b.is_locked_by_other()
    with pytest.raises(SpoolError, match=f"in use by process {os.getpid()}") as err:
        b.lock()
    assert "never share a spool" in err.value.hint
    a.close()
    assert not b.is_locked_by_other()
    with b.lock():
        assert a.is_locked_by_other()
    assert not a.is_locked_by_other()


def test_lock_held_by_another_process_and_freed_when_it_dies(tmp_path: Path) -> None:
    root = tmp_path / "s"
    code = ("import sys; from pathlib import Path; from relay.spool.store import Spool; "
            "s = Spool(Path(sys.argv[1])); s.lock(); print('locked', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        sp = Spool(root)
        assert sp.is_locked_by_other()
        with pytest.raises(SpoolError, match=f"process {proc.pid}"):
            sp.lock()
        with pytest.raises(SpoolError):
            sp.lock(timeout=0.2)                  # waits a little, then gives up
    finally:
        proc.kill()
        proc.wait()
    assert not sp.is_locked_by_other()
    sp.lock()
    sp.close()


@pytest.mark.fast
async def test_recover_refuses_under_a_running_relay(tmp_path: Path) -> None:
    running, other = Spool(tmp_path / "s"), Spool(tmp_path / "s")
    running.lock()
    running.recover()
    with pytest.raises(SpoolError, match="not recovering under it"):
        other.recover()
    running.close()
    assert other.recover() == []


@pytest.mark.fast
async def test_store_returns_only_after_data_rename_and_directory_are_synced(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The durability contract, as the sequence of calls store() makes before returning:
    the file created O_DSYNC (each write returns once on disk, as write + fdatasync),
    written, renamed into queue/, and queue/ synced."""
    calls: list[str] = []
    real = {name: getattr(os, name)
            for name in ("open", "write", "writev", "fdatasync", "fsync", "rename")}
    dirfd = spool._disk.dirfd

    def record(name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            if name == "open":
                if args[1] & os.O_CREAT:             # reads are not part of the contract
                    sync = " O_DSYNC" if args[1] & os.O_DSYNC else ""
                    calls.append(f"create in {Path(args[0]).parent.name}{sync}")
            elif name == "rename":
                calls.append(f"rename {Path(args[0]).parent.name}->{Path(args[1]).parent.name}")
            elif name == "fsync":
                calls.append("fsync dir" if args[0] == dirfd else "fsync file")
            else:
                calls.append(name)
            return real[name](*args)
        return call

    for name in real:
        monkeypatch.setattr(os, name, record(name))
    qid = await spool.store(envelope(), DATA)
    calls.append("returned")
    assert calls == ["create in tmp O_DSYNC", "writev", "rename tmp->queue", "fsync dir",
                     "returned"]

    calls.clear()
    msg = spool.load(qid)
    msg.state.attempts = 1
    await spool.save_state(msg)
    assert calls == ["create in tmp O_DSYNC", "writev", "rename tmp->queue", "fsync dir"]
    calls.clear()
    await spool.remove(qid)
    assert calls == []      # unlinks survive a process crash; no directory fsync needed


@pytest.mark.fast
async def test_a_short_writev_is_finished_by_plain_writes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        real = os.writev
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "writev", lambda fd, parts: real(fd, [bytes(parts[0])[:3]]))
            write_all(fd, b"head\r\n", b"body")
    finally:
        os.close(fd)
    assert path.read_bytes() == b"head\r\nbody"


@pytest.mark.fast
async def test_first_read_of_a_fresh_message_comes_from_memory_then_from_disk(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    qid = await spool.store(envelope(), DATA)
    opened: list[str] = []
    real_open = os.open

    def spy(path: Any, *args: Any) -> int:
        opened.append(str(path))
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", spy)
    assert await spool.read_message(qid) == DATA      # handed over without a disk read
    assert opened == []
    assert await spool.read_message(qid) == DATA      # a retry reads the disk copy
    assert any(p.endswith(qid) for p in opened)


@pytest.mark.fast
@pytest.mark.parametrize("size", [len(DATA), 2 << 20])
async def test_removals_unlink_in_worker_threads_never_on_the_loop(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, size: int) -> None:
    """An unlink may wait for the device (a synchronous discard): never on the loop, at
    any size; removals made together are all done when each returns."""
    body = DATA + b"x" * (size - len(DATA) - 2) + b"\r\n" if size > len(DATA) else DATA
    ids = [await spool.store(envelope(), body) for _ in range(12)]
    on_the_loop: list[bool] = []
    real = os.unlink

    def spy(path: Any, *args: Any, **kwargs: Any) -> None:
        on_the_loop.append(threading.current_thread() is threading.main_thread())
        real(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", spy)
    await asyncio.gather(*(spool.remove(qid) for qid in ids))
    assert on_the_loop == [False] * 12
    assert os.listdir(spool.queue) == [] and spool.queue_ids() == []


class UnlinkSpy:
    """Every os.unlink in queue/ by file name, and those that failed with ENOENT."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.missing: list[str] = []
        real = os.unlink

        def spy(path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> None:
            name = os.path.basename(path)
            self.calls.append(name)
            try:
                real(path, *args, **kwargs)
            except FileNotFoundError:
                self.missing.append(name)
                raise

        monkeypatch.setattr(os, "unlink", spy)

    def clear(self) -> None:
        self.calls.clear()
        self.missing.clear()


@pytest.mark.fast
async def test_removing_a_message_that_never_had_a_state_makes_no_failing_unlink(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main process removes every delivered message: for one delivered at its first
    attempt (no state file ever written) removal is one unlink, never an ENOENT."""
    stored = await spool.store(envelope(), DATA)
    listener = Spool(spool.root, written=lambda msg, data: spool.adopt(msg, data))
    handed = await listener.store(envelope(), DATA)     # an SMTP listener process's message
    unlinks = UnlinkSpy(monkeypatch)
    for qid in (stored, handed):
        unlinks.clear()
        await spool.remove(qid)
        assert unlinks.calls == [qid] and unlinks.missing == []
        assert qid not in spool
    assert os.listdir(spool.queue) == []


@pytest.mark.fast
async def test_a_state_file_saved_recovered_or_written_by_the_operator_is_removed(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removal never leaves a .state behind: after save_state, after a restart (found on
    disk) and after an operator's queue command."""
    saved, held, plain = [await spool.store(envelope(), DATA) for _ in range(3)]
    msg = spool.load(saved)
    msg.state.attempts, msg.state.next_attempt = 1, time.time() + 600
    await spool.save_state(msg)                              # a deferred attempt
    await QueueManager(spool).hold(held)                     # the operator's command
    assert sorted(os.listdir(spool.queue)) == sorted(
        [saved, saved + ".state", held, held + ".state", plain])
    unlinks = UnlinkSpy(monkeypatch)
    await spool.remove(saved)
    assert unlinks.calls == [saved + ".state", saved] and unlinks.missing == []

    restarted = Spool(spool.root)                            # a new process: from disk
    assert {m.queue_id for m in restarted.recover()} == {held, plain}
    unlinks.clear()
    await restarted.remove(held)
    assert unlinks.calls == [held + ".state", held] and unlinks.missing == []
    await restarted.remove(plain)           # may have had one, as far as it knows: unlinked
    assert unlinks.calls[2:] == [plain + ".state", plain]
    assert os.listdir(restarted.queue) == []
    restarted.close()


@pytest.mark.fast
async def test_a_state_saved_before_its_message_is_adopted_is_removed_too(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """An operator may hold a message by id (from the mail log) before the listener
    process's "stored" notice reaches the main process: adopt() must not forget that."""
    notices: list[tuple[QueuedMessage, bytes]] = []
    listener = Spool(spool.root, written=lambda msg, data: notices.append((msg, data)))
    qid = await listener.store(envelope(), DATA)
    msg = spool.load(qid)
    msg.state.held = True
    await spool.save_state(msg)
    spool.adopt(*notices[0])                                 # the notice arrives late
    unlinks = UnlinkSpy(monkeypatch)
    await spool.remove(qid)
    assert unlinks.calls == [qid + ".state", qid] and unlinks.missing == []
    assert os.listdir(spool.queue) == []
