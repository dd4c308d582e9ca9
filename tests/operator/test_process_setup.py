"""What both long-running relay processes (``relay run`` and each SMTP listener process)
set up first: their log line format, the cycle collector's pace and glibc's allocator."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.app.allocator import (
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    MMAP_THRESHOLD,
    TRIM_THRESHOLD,
    tune_allocator,
)
from relay.app.collector import YOUNG_THRESHOLD, pace_collector
from relay.cli import main
from relay.cli import run as run_command  # bound before a test patches what it imports
from relay.listenproc.__main__ import main as listener_main


def test_a_process_line_keeps_its_format() -> None:
    # In a child: setup_logging changes this process's logging for good.
    code = ("import logging\nfrom relay.app.logs import setup_logging\n"
            "setup_logging('info')\nlogging.getLogger('relay.mail').info('x: received')\n"
            "logging.getLogger('relay').warning('careful')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d relay\[\d+\]: "
    assert re.fullmatch(f"{stamp}relay.mail: INFO: x: received\n"
                        f"{stamp}relay: WARNING: careful\n", out.stderr), out.stderr


class _SetUp(Exception):
    pass


class _Started(Exception):
    pass


def _stop_here(*args: object) -> None:
    raise _SetUp


def _never_start(*args: object) -> None:
    raise _Started("relay started before its process set-up")


@pytest.mark.parametrize(("module", "step"), [
    ("relay.app.collector", "pace_collector"),
    ("relay.app.allocator", "tune_allocator"),
])
def test_both_long_running_processes_set_up_before_anything_runs(
        monkeypatch: pytest.MonkeyPatch, module: str, step: str) -> None:
    monkeypatch.setattr(f"{module}.{step}", _stop_here)
    monkeypatch.setattr(run_command, step, _stop_here)
    monkeypatch.setattr("relay.app.logs.setup_logging", lambda level: None)
    monkeypatch.setattr(run_command, "setup_logging", lambda level: None)
    monkeypatch.setattr("relay.app.runtime.App", _never_start)      # nothing runs here
    with pytest.raises(_SetUp):
        listener_main(["2147483000", "info", "2147483001"])
    with pytest.raises(_SetUp):
        main(["run", "-c", str(Path(__file__).parents[2] / "conf" / "relay.toml")])


def test_pacing_sets_the_young_threshold_only() -> None:
    before = gc.get_threshold()
    try:
        pace_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)


class _Libc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1


@pytest.mark.parametrize(("environ", "tuned"), [
    ({}, True),
    ({"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, True),
    ({"MALLOC_ARENA_MAX": "2"}, False),                 # the operator's choice stands
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}, False),
])
def test_the_allocator_is_tuned_unless_the_operator_did(environ: dict[str, str],
                                                        tuned: bool) -> None:
    libc = _Libc()
    assert tune_allocator(environ, libc) is tuned
    assert libc.calls == ([(M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                           (M_TRIM_THRESHOLD, TRIM_THRESHOLD)] if tuned else [])


def test_a_c_library_without_mallopt_is_left_alone() -> None:
    assert tune_allocator({}, object()) is False


READS = """
import resource, socket, sys
from relay.app.allocator import tune_allocator
if sys.argv[1] == "tuned":
    assert tune_allocator({})
a, b = socket.socketpair()
a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
chunk = b"x" * 65536
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    a.sendall(chunk)
    got = 0
    while got < len(chunk):
        got += len(b.recv(262144))                  # as asyncio reads a socket
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


def test_a_tuned_process_takes_no_page_fault_per_large_socket_read() -> None:
    """The mechanism, in fresh interpreters: 64 KB arriving into asyncio-sized reads."""
    def faults(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", READS, mode], capture_output=True,
                             text=True, timeout=60, check=True,
                             env={"PATH": "/usr/bin:/bin",
                                  "PYTHONPATH": str(Path(__file__).parents[2])})
        return float(out.stdout)

    assert faults("default") >= 8           # about one per 4 KB read
    assert faults("tuned") < 1
