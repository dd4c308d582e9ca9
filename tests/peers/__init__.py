"""Real peers started by the tests on free loopback ports: shared process helpers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_slice() -> range:
    """This pytest-xdist worker's own share of the ports below the ephemeral range.

    Ports from ``bind(0)`` come from the ephemeral range, which every outgoing connection
    on the machine also draws from, and a port probed and released by one worker can be
    handed to another worker's peer before ours binds it: both made tests fail with
    "Address already in use" now and then. A port below the ephemeral range that only this
    worker hands out is free of both races.
    """
    low, high = 12000, min(_ephemeral_low(), 32768)
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    size = (high - low) // workers
    if size < 200:      # an unusual ephemeral range: nothing safe to share out
        return range(0)
    start = low + (index % workers) * size
    return range(start, start + size)


_SLICE = _worker_slice()
_cursor = 0


def _binds(host: str, port: int, kind: socket.SocketKind) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))      # no SO_REUSEADDR: a port in TIME_WAIT is skipped too
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port (TCP and UDP) free on ``host`` now that no other test worker will hand out."""
    global _cursor
    for _ in range(len(_SLICE)):
        port = _SLICE[(_cursor + os.getpid() * 7919) % len(_SLICE)]   # spread by process
        _cursor += 1
        if _binds(host, port, socket.SOCK_STREAM) and _binds(host, port, socket.SOCK_DGRAM):
            return port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, *, timeout: float = 20.0,
                  proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (fail fast if ``proc`` died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            detail = log.read_text(errors="replace") if log and log.exists() else ""
            raise RuntimeError(f"peer exited with {proc.returncode} before listening:\n{detail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    detail = log.read_text(errors="replace") if log and log.exists() else ""
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout}s\n{detail}")


def wait_until(cond: object, *, timeout: float = 20.0, interval: float = 0.02) -> None:
    """Poll ``cond()`` until truthy; raise TimeoutError otherwise (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


# The test now running in the fast lane (set by tests/conftest.py), or None: fast tests
# start no peers, no relay and no other program.
_fast_test: str | None = None


@contextlib.contextmanager
def fast_lane(nodeid: str) -> Iterator[None]:
    """Run a block as the fast test ``nodeid``: starting a peer in it fails that test."""
    global _fast_test
    _fast_test = nodeid
    try:
        yield
    finally:
        _fast_test = None


def refuse_in_fast_lane(program: str, *, verb: str = "starts") -> None:
    """Fail the running test, naming ``program``, if it is a fast test (see fast_lane)."""
    if _fast_test is not None:
        pytest.fail(f"test {_fast_test} is marked fast but {verb} {program}; "
                    "remove the fast marker", pytrace=False)


def need(binary: str) -> str:
    """Absolute path of a peer binary; a clear failure (never a skip) when missing."""
    refuse_in_fast_lane(binary)
    for candidate in (shutil.which(binary), f"/usr/sbin/{binary}", f"/usr/bin/{binary}",
                      f"/usr/lib/postfix/sbin/{binary}"):
        if candidate and os.path.exists(candidate):
            return candidate
    raise RuntimeError(f"{binary} is not installed: run scripts/test, which installs the "
                       "Debian packages listed in scripts/test-debs.txt")


@contextlib.contextmanager
def running(argv: Sequence[str], *, log: Path, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run a peer process for the duration of a ``with`` block; stop it by its pid."""
    refuse_in_fast_lane(Path(argv[0]).name)
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                env=env, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
