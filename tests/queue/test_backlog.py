"""Queue tools for a backlog: several ids, --all, filters, a plan first, confirmed deletes."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import sys
from pathlib import Path

from relay.control.queue import QueueManager
from relay.control.socket import ControlServer
from tests.queue.conftest import FakeScheduler, Queue

ROOT = Path(__file__).parents[2]


async def cli(*argv: str, answer: str | None = None) -> tuple[int, str, str]:
    """`python -m relay ...`; stdin is /dev/null, or a terminal typing ``answer``."""
    if answer is None:
        stdin: int = asyncio.subprocess.DEVNULL
        master = -1
    else:
        master, stdin = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *argv, cwd=ROOT, stdin=stdin,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    if answer is not None:
        os.close(stdin)
        os.write(master, answer.encode())
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if master >= 0:
            os.close(master)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def on_disk(queue: Queue) -> list[str]:
    """The ids queued in the spool's files now (not the test's own index of them)."""
    return sorted(m.queue_id for m in queue.spool.scan())


async def test_several_ids_say_what_they_do_then_do_it(queue: Queue) -> None:
    spool = str(queue.spool.root)
    code, out, err = await cli("queue", "hold", queue.ids[0], queue.ids[1], "--spool", spool)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "hold 2 messages:"
    assert lines[1].startswith(f"  {queue.ids[0]}  active    from <agent@example.com>  ")
    assert lines[2].startswith(f"  {queue.ids[1]}  deferred  from <agent@example.com>  ")
    assert lines[2].endswith(" old  to <b@example.net>")         # a.net was delivered
    assert lines[3] == "2 messages held"
    assert all(queue.spool.load(i).state.held for i in queue.ids)
    code, out, err = await cli("queue", "release", "--all", "--spool", spool)
    assert out.splitlines()[-1] == "3 messages released"
    assert not any(queue.spool.load(i).state.held for i in queue.ids)


async def test_deleting_more_than_one_needs_yes_or_a_terminal(queue: Queue) -> None:
    spool = str(queue.spool.root)
    code, out, err = await cli("queue", "delete", "--all", "--spool", spool)
    assert code == 1
    assert out.startswith("delete 3 messages:\n")
    assert err == ("relay: nothing deleted: deleting 3 messages needs confirmation\n"
                   "  hint: run it again with --yes, or from a terminal to be asked\n")
    assert on_disk(queue) == queue.ids
    code, out, err = await cli("queue", "delete", "--to", "@example.net", "--spool", spool,
                               answer="n\n")
    assert code == 1 and "Delete these 3 messages? [y/N]" in err
    assert on_disk(queue) == queue.ids
    code, out, err = await cli("queue", "delete", "--state", "deferred", "--state", "active",
                               "--spool", spool)   # the last --state counts: one message
    assert code == 0 and out.splitlines()[-1] == "1 message deleted"
    code, out, err = await cli("queue", "delete", "--all", "--spool", spool, answer="y\n")
    assert code == 0, err
    assert err == "Delete these 2 messages? [y/N] "
    assert out.splitlines()[-1] == "2 messages deleted"
    assert on_disk(queue) == []


async def test_filters_pick_the_messages(queue: Queue) -> None:
    spool = str(queue.spool.root)

    async def listed(*filters: str) -> list[str]:
        code, out, err = await cli("queue", "list", "--json", "--spool", spool, *filters)
        assert code == 0, err
        return [m["id"] for m in json.loads(out)["messages"]]
    assert await listed() == queue.ids
    assert await listed("--state", "held") == [queue.ids[2]]
    assert await listed("--to", "@example.net", "--state", "deferred") == [queue.ids[1]]
    assert await listed("--to", "a@example.net") == []        # delivered: not waiting
    assert await listed("--from", "*@example.com", "--older-than", "30s") == queue.ids
    assert await listed("--older-than", "1h") == []
    assert await listed("--from", "<>") == []
    code, out, err = await cli("queue", "list", "--older-than", "soon", "--spool", spool)
    assert code == 2 and "'soon' is not a duration" in err
    code, out, err = await cli("queue", "retry", "--spool", spool)
    assert code == 1 and "relay queue retry: which messages?" in err and "--all" in err
    code, out, err = await cli("queue", "release", "--state", "deferred", "--spool", spool)
    assert code == 0 and out.splitlines()[-1] == "0 messages released; 1 already released"
    code, out, err = await cli("queue", "hold", queue.ids[0], "0" * 17, "--spool", spool)
    assert code == 1
    assert f"  {'0' * 17}  not in the queue" in out
    assert out.splitlines()[-1] == ("1 message held; 1 not in the queue (delivered, bounced "
                                    "or deleted meanwhile)")


async def test_a_backlog_through_the_running_relay(queue: Queue) -> None:
    hook = FakeScheduler(queue.spool)
    queue.spool.lock()
    srv = ControlServer(QueueManager(queue.spool, hook), queue.spool.root / "control.sock")
    await srv.start()
    try:
        code, out, err = await cli("queue", "retry", "--all", "--json", "--spool",
                                   str(queue.spool.root))
        assert code == 0, err
        result = json.loads(out)
        assert [m["id"] for m in result["selected"]] == queue.ids
        assert result["result"]["done"] == queue.ids[:2]
        assert result["result"]["held"] == [queue.ids[2]]
        assert ("retry_now", queue.ids[1]) in hook.calls    # the scheduler was told
    finally:
        await srv.stop()
