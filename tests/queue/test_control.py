"""The control socket end to end, and `relay queue` as a subprocess in both of its modes."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.control.queue import QueueManager
from relay.control.socket import ControlServer, request
from relay.errors import ControlError
from tests.queue.conftest import FakeScheduler, Queue

ROOT = Path(__file__).parents[2]


@pytest.fixture
def hook(queue: Queue) -> FakeScheduler:
    return FakeScheduler(queue.spool)


@pytest.fixture
async def server(queue: Queue, hook: FakeScheduler) -> AsyncIterator[ControlServer]:
    """What the running relay does: hold the spool lock and serve the control socket."""
    reloads: list[dict[str, Any]] = []

    async def reload(args: dict[str, Any]) -> dict[str, Any]:
        reloads.append(args)
        return {"reloaded": True}

    async def status(args: dict[str, Any]) -> dict[str, Any]:
        return {"version": "test", "queue": queue.spool.stats().counts}

    queue.spool.lock()
    srv = ControlServer(QueueManager(queue.spool, hook), queue.spool.root / "control.sock",
                        commands={"reload": reload, "status": status})
    await srv.start()
    yield srv
    await srv.stop()


async def relay_cli(*argv: str) -> tuple[int, str, str]:
    """Run `python -m relay ...` without blocking this loop (which serves the socket)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *argv, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_requests_over_the_socket(queue: Queue, server: ControlServer,
                                        hook: FakeScheduler) -> None:
    path = server.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    listed = await request(path, "list")
    assert [m["id"] for m in listed["messages"]] == queue.ids
    assert (await request(path, "show", id=queue.ids[0]))["id"] == queue.ids[0]
    assert await request(path, "hold", id=queue.ids[0]) == {"held": queue.ids[0],
                                                            "already": False}
    assert ("forget", queue.ids[0]) in hook.calls
    assert await request(path, "reload") == {"reloaded": True}
    assert (await request(path, "status"))["queue"]["held"] == 2
    with pytest.raises(ControlError) as err:
        await request(path, "show", id="0" * 17)
    assert err.value.code == "not_found" and "relay queue list" in err.value.hint
    with pytest.raises(ControlError) as err:
        await request(path, "flush")
    assert err.value.code == "bad_request" and "reload" in err.value.hint


async def test_malformed_lines_get_an_error_and_the_connection_goes_on(
        server: ControlServer) -> None:
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    for line in (b"not json\n", b"[1]\n", b'{"command": "list", "args": 3}\n',
                 b'{"command": "status"}\n'):
        writer.write(line)
        await writer.drain()
        reply = json.loads(await asyncio.wait_for(reader.readline(), 10))
        if line.startswith(b'{"command": "status"'):
            assert reply["ok"] and reply["result"]["version"] == "test"
        else:
            assert not reply["ok"] and reply["code"] == "bad_request", reply
    writer.close()
    await writer.wait_closed()


async def test_stale_socket_is_replaced_and_stop_removes_it(queue: Queue) -> None:
    path = queue.spool.root / "control.sock"
    first = ControlServer(QueueManager(queue.spool), path)
    await first.start()
    second = ControlServer(QueueManager(queue.spool), path)
    with pytest.raises(ControlError, match="another process answers"):
        await second.start()                  # a live socket is never stolen
    await first.stop()
    assert not path.exists()

    import socket
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))                     # bound, nobody listening: a dead relay's
    stale.close()
    await second.start()
    assert (await request(path, "list"))["count"] == 3
    await second.stop()

    path.write_text("x")
    with pytest.raises(ControlError, match="is not a socket"):
        await ControlServer(None, path).start()


async def test_unreachable_relay_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ControlError) as err:
        await request(tmp_path / "nothing.sock", "list", timeout=5)
    assert err.value.code == "unreachable" and "try again" in err.value.hint


async def test_cli_talks_to_the_running_relay(queue: Queue, server: ControlServer,
                                              hook: FakeScheduler) -> None:
    spool = str(queue.spool.root)
    code, out, err = await relay_cli("queue", "list", "--spool", spool)
    assert code == 0, err
    for qid in queue.ids:
        assert qid in out
    assert "451 4.7.0 greylisted" in out and "<agent@example.com>" in out
    assert out.rstrip().endswith("(1 active, 1 deferred, 1 held)")

    code, out, err = await relay_cli("queue", "list", "--json", "--spool", spool)
    assert code == 0 and [m["id"] for m in json.loads(out)["messages"]] == queue.ids

    code, out, err = await relay_cli("queue", "show", queue.ids[1], "--spool", spool)
    assert code == 0 and "Subject: Your case 42" in out and "<b@example.net> pending" in out

    code, out, err = await relay_cli("queue", "hold", queue.ids[0], "--spool", spool)
    assert (code, out.strip()) == (0, f"{queue.ids[0]}: held")
    assert ("forget", queue.ids[0]) in hook.calls   # the live scheduler was told

    code, out, err = await relay_cli("queue", "retry", "--all", "--spool", spool)
    assert code == 0 and "1 message due now; 2 held" in out

    code, out, err = await relay_cli("queue", "delete", "0" * 17, "--spool", spool)
    assert code == 1 and f"message {'0' * 17} is not in the queue" in err and "hint:" in err


async def test_cli_when_the_relay_does_not_answer(queue: Queue) -> None:
    queue.spool.lock()                        # "running" but no control socket
    code, _out, err = await relay_cli("queue", "list", "--spool", str(queue.spool.root))
    assert code == 1 and "no relay answers on the control socket" in err and "hint:" in err


async def test_cli_acts_on_the_files_when_no_relay_runs(queue: Queue) -> None:
    spool = str(queue.spool.root)
    code, out, err = await relay_cli("queue", "hold", queue.ids[0].lower(), "--spool", spool)
    assert code == 0, err
    assert queue.spool.load(queue.ids[0]).state.held
    code, out, err = await relay_cli("queue", "delete", queue.ids[1], "--json", "--spool", spool)
    assert code == 0 and json.loads(out) == {"deleted": queue.ids[1], "waited_for_attempt": False}
    code, out, err = await relay_cli("queue", "list", "--spool", spool)
    assert queue.ids[1] not in out and "(0 active, 0 deferred, 2 held)" in out
    assert not queue.spool.is_locked_by_other()      # the tool let go of the lock

    code, out, err = await relay_cli("queue", "show", "../../etc/passwd", "--spool", spool)
    assert code == 1 and "is not a queue id" in err
    code, out, err = await relay_cli("queue", "list", "--spool", str(queue.spool.root / "nope"))
    assert code == 1 and "is not a relay spool" in err


async def test_cli_finds_the_spool_and_socket_through_the_config(
        queue: Queue, hook: FakeScheduler, tmp_path: Path) -> None:
    sock = tmp_path / "ctl.sock"
    config = tmp_path / "relay.toml"
    config.write_text(f"""
[relay]
hostname = "localhost"
spool = "{queue.spool.root}"
control_socket = "{sock}"
default_upstream = "outbox"

[[listener]]
name = "local"
protocol = "smtp"
listen = "127.0.0.1:2525"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "outbox"
protocol = "outbox"
path = "{tmp_path / 'outbox'}"
""")
    queue.spool.lock()
    srv = ControlServer(QueueManager(queue.spool, hook), sock)
    await srv.start()
    try:
        code, out, err = await relay_cli("queue", "list", "--json", "-c", str(config))
        assert code == 0, err
        assert json.loads(out)["count"] == 3
    finally:
        await srv.stop()
