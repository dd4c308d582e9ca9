"""Debian's redis-server, started privately on a free loopback port (no persistence).

Needs the ``redis-server`` package (scripts/test-debs.txt). Each server has its own
temporary directory and port, writes nothing to disk (``--save '' --appendonly no``),
and is stopped by its pid; ``stop()`` then ``start()`` again on the same port is a
Redis that restarted empty, as after a crash.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.peers import free_port, need, wait_for_port


class RedisServer:
    def __init__(self, work: Path, port: int | None = None) -> None:
        self.work = work
        self.port = port or free_port()
        self.log = work / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        argv = [need("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.work),
                "--protected-mode", "yes", "--daemonize", "no"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for_port("127.0.0.1", self.port, proc=self.proc, log=self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """Stop answering without closing connections (SIGSTOP): a hung Redis."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[RedisServer]:
    server = RedisServer(work).start()
    try:
        yield server
    finally:
        if server.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGCONT)
        server.stop()
