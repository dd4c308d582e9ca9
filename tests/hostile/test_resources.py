"""Out of file descriptors or memory: accept loops pause, log once per interval, and resume.

The integration case runs the real relay with a small descriptor limit and fills it
with clients: accept() then fails again and again, yet relay logs it once (not once per
attempt), stays up, and serves again as soon as descriptors come back. The unit cases
drive ``AcceptLoop`` over a listening socket whose accept() fails with ENOMEM/ENOBUFS/
EMFILE on cue (memory pressure cannot be produced on demand in a test).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.acceptloop import AcceptLoop
from relay.metrics import Metrics
from tests.peers import free_port, refuse_in_fast_lane, wait_for_port, wait_until
from tests.peers.relayproc import ROOT, send

LIMIT = 64                                  # RLIMIT_NOFILE of the relay under test


def config(work: Path, port: int) -> str:
    return f"""[relay]
hostname = "relay.test"
spool = "{work / 'spool'}"
default_upstream = "box"
smtp_processes = 0

[metrics]
enabled = false

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
max_connections = 500
max_connections_per_client = 500

[[upstream]]
name = "box"
protocol = "outbox"
path = "{work / 'outbox'}"
"""


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))


def greeted(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(100).startswith(b"220 ")
    except (TimeoutError, ConnectionError):
        return False


def test_out_of_descriptors_pauses_logs_once_and_resumes(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "relay.toml").write_text(config(tmp_path, port))
    log = tmp_path / "relay.log"
    refuse_in_fast_lane("relay (python -m relay run)")
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "-c",
                                 str(tmp_path / "relay.toml")], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_low_nofile,
                                start_new_session=True)
    clients: list[socket.socket] = []
    try:
        wait_for_port("127.0.0.1", port, proc=proc, log=log, timeout=60)
        wait_until(lambda: "relay started" in log.read_text(), timeout=60)
        # More clients than relay has descriptors: the kernel completes each connection
        # (the backlog), relay accepts until it runs out, then accept() fails.
        for _ in range(2 * LIMIT):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        served = sum(greeted(c, 0.5) for c in clients[:LIMIT // 2])
        assert served > 0
        wait_until(lambda: "out of file descriptors" in log.read_text(), timeout=30)
        assert not greeted(clients[-1], 2.0)          # waiting in the backlog, unserved
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert text.count("cannot accept connections: out of file descriptors") == 1, text
        assert "raise LimitNOFILE" in text and "Traceback" not in text
        for c in clients:                             # descriptors come back
            c.close()
        clients.clear()
        wait_until(lambda: "accepting connections again" in log.read_text(), timeout=30)
        send(port, subject="after the shortage")
        wait_until(lambda: len(list((tmp_path / "outbox").glob("*.eml"))) == 1, timeout=30)
        text = log.read_text()
        assert text.count("cannot accept connections") == 1, text
        assert "Traceback" not in text and "socket.accept() out of system resource" not in text
    finally:
        for c in clients:
            c.close()
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            proc.wait(30)


class _FailingSocket(socket.socket):
    """A real listening socket whose accept() fails with ``errors`` first."""

    errors: list[int]

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


@pytest.mark.parametrize(("code", "reason", "what"), [
    (errno.ENOMEM, "memory", "out of memory"),
    (errno.ENOBUFS, "memory", "out of memory"),
    (errno.EMFILE, "descriptors", "out of file descriptors"),
    (errno.ENFILE, "system_descriptors", "the system is out of file descriptors"),
])
async def test_accept_loop_backs_off_logs_once_and_resumes(
        code: int, reason: str, what: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.accept")
    listening = _FailingSocket(socket.AF_INET, socket.SOCK_STREAM)
    listening.errors = [code] * 6
    listening.bind(("127.0.0.1", 0))
    listening.listen(10)
    listening.setblocking(False)
    port = listening.getsockname()[1]
    made: list[asyncio.Protocol] = []

    class Greeter(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            made.append(self)
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(b"hello\r\n")
            transport.close()

    metrics = Metrics()
    loop = AcceptLoop("test", [listening], Greeter, metrics=metrics, backoff=(0.01, 0.04))
    loop.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        async with asyncio.timeout(10):
            assert await reader.readline() == b"hello\r\n"        # served after the shortage
        writer.close()
        failed = metrics.registry.get_sample_value(
            "relay_accept_errors_total", {"server": "test", "reason": reason})
        assert failed == 6
        lines = [r.getMessage() for r in caplog.records]
        assert sum(what in line for line in lines) == 1, lines        # once per interval
        assert any("accepting connections again" in line and "6 accept() calls failed" in line
                   for line in lines), lines
        assert len(made) == 1
    finally:
        loop.close()
        await loop.wait_closed()
        with contextlib.suppress(OSError):
            listening.close()
