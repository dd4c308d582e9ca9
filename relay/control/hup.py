"""SIGHUP for the relay that holds a spool's lock, and for no other process.

``relay reload`` asks over the control socket first. When that does not answer, a pid
file alone proves nothing (relay may have died and the pid been reused by anything), so
the signal goes only to a process that (1) holds the flock on ``<spool>/lock`` right now,
as the kernel reports it in /proc/locks, and (2) runs ``relay run``. Anything else is
refused with what was found, and nothing is signalled.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from relay.config.schema import RelaySection
from relay.control.paths import lock_path, pid_path

PROC = Path("/proc")


@dataclass(frozen=True, slots=True)
class Found:
    """The relay process proven to hold the spool lock, or why there is none."""

    pid: int | None
    why: str


def lock_holders(lock: Path, *, proc: Path = PROC) -> list[int]:
    """The pids holding a flock on ``lock`` (from the kernel's /proc/locks)."""
    try:
        st = os.stat(lock)
        table = (proc / "locks").read_text()
    except OSError:
        return []
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders: list[int] = []
    for line in table.splitlines():
        fields = line.split()
        if "->" in fields:                    # a waiter, not a holder
            continue
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == dev \
                and fields[4].isdigit():
            holders.append(int(fields[4]))
    return holders


def command_line(pid: int, *, proc: Path = PROC) -> list[str]:
    """A process's argv (empty if it is gone or hidden)."""
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def is_relay_run(argv: list[str]) -> bool:
    """True for ``relay run ...``, ``python [-opts] /path/relay run ...`` and
    ``python [-opts] -m relay run ...``."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "relay":
            before = argv[1:i]
            if i == 0 or all(a.startswith("-") for a in before):
                return argv[i + 1:i + 2] == ["run"]
            return False
        if i > 0 and not arg.startswith("-"):
            return False                 # a script or module other than relay
    return False


def find_running_relay(relay: RelaySection, *, proc: Path = PROC) -> Found:
    """The pid of the relay serving this spool, proven by its lock, or why not."""
    lock = lock_path(relay)
    named = _read_pid(pid_path(relay))
    stale = (f"; the pid file {pid_path(relay)} names process {named}, which was not "
             "signalled" if named else "")
    holders = lock_holders(lock, proc=proc)
    if not holders:
        return Found(None, f"no process holds the spool lock {lock}, so no relay runs on "
                           f"the spool {relay.spool}{stale}")
    for pid in holders:
        argv = command_line(pid, proc=proc)
        if is_relay_run(argv):
            return Found(pid, f"process {pid} holds the spool lock {lock} and runs "
                              f"`{' '.join(argv)}`")
    shown = ", ".join(f"{pid} (`{' '.join(command_line(pid, proc=proc)) or '?'}`)"
                      for pid in holders)
    return Found(None, f"the spool lock {lock} is held by process {shown}, which is not "
                       f"`relay run`{stale}")


def send_sighup(relay: RelaySection) -> Found:
    """SIGHUP the proven relay; ``Found.pid`` is None (and nothing sent) otherwise."""
    found = find_running_relay(relay)
    if found.pid is not None:
        os.kill(found.pid, signal.SIGHUP)
    return found


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
