"""sd_notify messages arrive on a real Unix datagram socket, as systemd would receive them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.ops.sdnotify import SystemdNotifier


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield path, sock


def fields(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_lifecycle_messages(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("Serving 2 listeners")
    assert fields(sock) == {"READY": "1", "STATUS": "Serving 2 listeners"}
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    got = fields(sock)
    assert got["RELOADING"] == "1" and got["STATUS"] == "Reloading configuration"
    assert before <= int(got["MONOTONIC_USEC"]) <= time.clock_gettime_ns(
        time.CLOCK_MONOTONIC) // 1000
    assert n.ready()
    assert fields(sock) == {"READY": "1"}
    assert n.status("line one\nINJECTED=1")
    assert fields(sock) == {"STATUS": "line one INJECTED=1"}
    assert n.extend_timeout(45)
    assert fields(sock) == {"EXTEND_TIMEOUT_USEC": "45000000"}
    assert n.stopping()
    assert fields(sock) == {"STOPPING": "1", "STATUS": "Draining"}
    n.close()


def test_abstract_namespace_socket() -> None:
    name = f"relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = SystemdNotifier(f"@{name}")
        assert n.ready()
        assert fields(sock) == {"READY": "1"}
        n.close()


@pytest.mark.fast
def test_without_systemd_everything_is_a_no_op() -> None:
    n = SystemdNotifier.from_environ({})
    assert not n.enabled
    assert not n.ready() and not n.stopping() and not n.reloading() and not n.watchdog()
    assert n.watchdog_interval is None


def test_unsupported_or_dead_socket_is_logged_not_raised(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier("vsock:2:1234")
    assert not n.enabled and not n.ready()
    assert "NOTIFY_SOCKET" in caplog.text
    gone = SystemdNotifier(str(tmp_path / "nobody-listens.sock"))
    assert gone.enabled
    assert not gone.ready()
    assert "Type=notify" in caplog.text


def test_watchdog(receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000000", "WATCHDOG_PID": str(os.getpid())}
    n = SystemdNotifier.from_environ(env)
    assert n.watchdog_interval == 10.0
    assert n.watchdog()
    assert fields(sock) == {"WATCHDOG": "1"}
    other = SystemdNotifier.from_environ({**env, "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None                  # meant for another process


async def test_watchdog_loop_pings_until_cancelled(
        receiver: tuple[str, socket.socket]) -> None:
    path, sock = receiver
    sock.setblocking(False)
    n = SystemdNotifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "40000"})
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(n.watchdog_loop())
    try:
        for _ in range(3):
            data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
            assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # Without WatchdogSec the loop returns at once.
    await asyncio.wait_for(SystemdNotifier(path).watchdog_loop(), 1)
