"""End-to-end SMTP relay throughput: relay vs a private Postfix relay, side by side.

Both relays accept from Postfix's ``smtp-source`` and deliver to one ``smtp-sink`` on
loopback, with their own fsynced queues. For each scenario (message size x concurrent
sessions) the bench sends N messages, waits until the sink has counted all N deliveries,
and prints messages/s, CPU seconds per message (from a cgroup around each relay's
processes, so Postfix's many processes count too) and peak memory.

    python bench/smtp_bench.py                 # the issue's four scenarios
    python bench/smtp_bench.py --quick         # fewer messages, for a smoke run
    python bench/smtp_bench.py --checks        # relay with structure checks "strict" vs
                                               # "off", side by side (no Postfix)

Needs root (cgroups, smtp-sink -u) and Debian's postfix package (scripts/test installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CG_CPU = Path("/sys/fs/cgroup/cpuacct")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Cgroup:
    """A cgroup-v1 cpuacct group: CPU of all its processes, and their peak RSS."""

    def __init__(self, name: str) -> None:
        self.cpu = CG_CPU / name
        self.cpu.mkdir(exist_ok=True)

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside this group (the shell joins it, then execs argv)."""
        join = f"echo $$ > {self.cpu}/cgroup.procs; "
        return ["sh", "-c", join + 'exec "$@"', "sh", *argv]

    def cpu_seconds(self) -> float:
        return int((self.cpu / "cpuacct.usage").read_text()) / 1e9

    def peak_mb(self) -> float:
        """Sum of the peak resident set (VmHWM) of the group's live processes.

        The memory cgroup's own peak counts page cache (the spool files), which says
        nothing about the relay's footprint, so resident memory is read per process.
        """
        total = 0
        for pid in (self.cpu / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        return total / 1024

    def remove(self) -> None:
        for pid in (self.cpu / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.cpu.rmdir()
                break
            except OSError:
                time.sleep(0.1)


class Sink:
    """smtp-sink counting DATA completions; ``count()`` reads its running counter."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.out = work / "sink.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{self.port}", "1024"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)

    def count(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes()[-128:])
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@dataclass
class Result:
    rate: float
    cpu_per_msg: float
    peak_mb: float
    elapsed: float


class Postfix:
    name = "postfix"

    def __init__(self, work: Path, sink_port: int) -> None:
        self.dir = work / "postfix"
        conf, queue, data = self.dir / "conf", self.dir / "queue", self.dir / "data"
        for d in (conf, queue, data):
            d.mkdir(parents=True)
        shutil.chown(data, "postfix")
        self.port = free_port()
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [f"127.0.0.1:{self.port} inet n - n - - smtpd"
                  if line.startswith("smtp      inet") else line for line in master]
        (conf / "master.cf").write_text("\n".join(master) + "\n")
        (conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
myhostname = bench.localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
smtp_tls_security_level = none
default_destination_concurrency_limit = 20
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
""")
        self.conf = conf
        self.cg = Cgroup(f"relaybench-postfix-{os.getpid()}")

    def start(self) -> None:
        subprocess.run(self.cg.wrap(["postfix", "-c", str(self.conf), "start"]), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.cg.remove()


class Relay:
    name = "relay"

    def __init__(self, work: Path, sink_port: int, *, fsync: bool = True,
                 label: str = "relay", listener_extra: str = "") -> None:
        self.name = label
        self.dir = work / label
        self.dir.mkdir()
        self.port = free_port()
        self.config = self.dir / "relay.toml"
        self.config.write_text(f"""[relay]
hostname = "bench.localdomain"
spool = "{self.dir / 'spool'}"
default_upstream = "sink"
fsync = {'true' if fsync else 'false'}

[metrics]
enabled = false

[[listener]]
name = "bench"
protocol = "smtp"
listen = "127.0.0.1:{self.port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
max_connections = 500
max_connections_per_client = 500
{listener_extra}
[[upstream]]
name = "sink"
protocol = "smtp"
host = "127.0.0.1"
port = {sink_port}
tls = "none"
max_connections = 20
""")
        self.cg = Cgroup(f"relaybench-{label}-{os.getpid()}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "relay.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.cg.wrap([sys.executable, "-m", "relay", "run", "-c", str(self.config)]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.cg.remove()


def run_scenario(target: Postfix | Relay, sink: Sink, *, size: int, sessions: int,
                 count: int, timeout: float) -> Result:
    base = sink.count()
    cpu0 = target.cg.cpu_seconds()
    t0 = time.monotonic()
    src = subprocess.run(
        ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
         "-f", "bench@example.com", "-t", "sink@example.net", "-M", "bench.localdomain",
         f"127.0.0.1:{target.port}"], capture_output=True, timeout=timeout, check=False)
    if src.returncode != 0:
        raise RuntimeError(f"smtp-source against {target.name} failed: {src.stderr!r}")
    deadline = t0 + timeout
    while sink.count() - base < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target.name}: only {sink.count() - base}/{count} delivered "
                               f"within {timeout}s")
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    cpu = target.cg.cpu_seconds() - cpu0
    return Result(count / elapsed, cpu / count, target.cg.peak_mb(), elapsed)


@contextlib.contextmanager
def started(target: Postfix | Relay) -> Iterator[Postfix | Relay]:
    target.start()
    try:
        yield target
    finally:
        target.stop()


CHECK_LEVELS = ("strict", "off")


def settle(relay: Relay, timeout: float = 120.0) -> None:
    """Wait until ``relay`` has removed every delivered message from its spool, so that
    its clean-up does not compete with (or get counted in) the next run."""
    queue = relay.dir / "spool" / "queue"
    deadline = time.monotonic() + timeout
    while queue.exists() and any(queue.iterdir()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{relay.name}: spool not empty after {timeout}s")
        time.sleep(0.05)


def inline_cost() -> dict[int, float]:
    """The structure checks alone, in this process, on smtp-source-shaped messages:
    seconds per message by size."""
    import timeit

    from relay.checks.structure import inspect
    from relay.config.schema import STRUCTURE_LEVELS

    head = (b"Received: from vm ([127.0.0.1])\r\n\tby bench (relay) with ESMTP;\r\n"
            b"\tSun, 06 Dec 2026 07:59:55 +0000\r\nFrom: <bench@example.com>\r\n"
            b"To: <sink@example.net>\r\nDate: Sun, 06 Dec 2026 07:59:55 +0000\r\n"
            b"Message-Id: <577e.0003.0000@vm>\r\n\r\n")
    costs = {}
    for size in (1024, 100 * 1024):
        data = head + (b"X" * 78 + b"\r\n") * (size // 80)
        start = head.index(b"From:")
        n = 2000 if size == 1024 else 200
        check = functools.partial(inspect, data, start=start,
                                  checks=STRUCTURE_LEVELS["strict"])
        check()
        t = min(timeit.repeat(check, number=n, repeat=5)) / n
        costs[size] = t
        print(f"  structure checks alone, {size // 1024:4d} KB message: {t * 1e6:7.1f} us")
    return costs


def compare_checks(work: Path, sink: Sink, *, counts: dict[int, int], repeat: int,
                   fsync: bool) -> None:
    """Relay with every structure check on ("strict") next to relay with them "off".

    Both relays run side by side on the same sink, each in its own cgroup; the scenarios
    alternate between them ``repeat`` times (so a burst of load from elsewhere hits both)
    and the median of each is printed with the on/off ratio.
    """
    relays = [Relay(work, sink.port, fsync=fsync, label=f"checks-{level}",
                    listener_extra=f'structure_checks = "{level}"\n')
              for level in CHECK_LEVELS]
    scenarios = [(1024, 1), (1024, 20), (100 * 1024, 1), (100 * 1024, 20)]
    runs: dict[tuple[str, int, int], list[Result]] = {}
    alone = inline_cost()
    with started(relays[0]), started(relays[1]):
        for target in relays:                   # warm up: imports, pools, page cache
            run_scenario(target, sink, size=1024, sessions=20, count=200, timeout=300)
            settle(target)
        for i in range(repeat):
            for size, sessions in scenarios:
                order = relays if i % 2 == 0 else relays[::-1]
                for target in order:
                    res = run_scenario(target, sink, size=size, sessions=sessions,
                                       count=counts[size], timeout=300)
                    settle(target)
                    runs.setdefault((target.name, size, sessions), []).append(res)
                    print(f"  {target.name:14} {size // 1024:4d} KB x{sessions:<3d} "
                          f"{res.rate:7.0f} msg/s  {res.cpu_per_msg * 1000:6.2f} ms CPU/msg",
                          flush=True)

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    print()
    print(f"{'scenario':<14}{'off msg/s':>11}{'on msg/s':>10}{'on/off':>8}{'paired':>8}"
          f"{'off ms CPU':>12}{'on ms CPU':>11}{'checks alone':>14}")
    for size, sessions in scenarios:
        on = runs[(f"checks-{CHECK_LEVELS[0]}", size, sessions)]
        off = runs[(f"checks-{CHECK_LEVELS[1]}", size, sessions)]
        r_on, r_off = median([r.rate for r in on]), median([r.rate for r in off])
        paired = median([a.rate / b.rate for a, b in zip(on, off, strict=True)])
        c_on = median([r.cpu_per_msg for r in on]) * 1000
        c_off = median([r.cpu_per_msg for r in off]) * 1000
        share = alone[size] * 1000 / c_off
        print(f"{f'{size // 1024} KB x{sessions}':<14}{r_off:>11.0f}{r_on:>10.0f}"
              f"{r_on / r_off:>8.3f}{paired:>8.3f}{c_off:>12.2f}{c_on:>11.2f}"
              f"{share:>13.1%}")
    print(f"\nmedians of {repeat} alternating runs per scenario (paired: the median of each "
          "run's on/off ratio); checks alone: their own CPU per message as a share of "
          "relay's (off). Target (issue 10): on/off throughput >= 0.95")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages (smoke run)")
    ap.add_argument("--only", choices=["relay", "postfix"], help="run one side only")
    ap.add_argument("--no-fsync", action="store_true", help="relay without fsync (not a fair "
                    "comparison: for locating bottlenecks only)")
    ap.add_argument("--checks", action="store_true",
                    help='relay with structure checks "strict" vs "off" (no Postfix)')
    ap.add_argument("--repeat", type=int, default=3, metavar="N",
                    help="--checks: alternating runs per scenario (median shown)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/smtp_bench.py needs root (cgroups, smtp-sink -u)", file=sys.stderr)
        return 2
    scenarios = [(1024, 1), (1024, 20), (100 * 1024, 1), (100 * 1024, 20)]
    counts = {1024: 3000, 100 * 1024: 1500}
    if args.quick:
        counts = {1024: 300, 100 * 1024: 150}
    rows: list[tuple[int, int, Result | None, Result | None]] = []
    if args.checks:
        with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp:
            work = Path(tmp)
            os.chmod(work, 0o755)
            sink = Sink(work)
            try:
                compare_checks(work, sink, counts=counts, repeat=max(1, args.repeat),
                               fsync=not args.no_fsync)
            finally:
                sink.stop()
        return 0
    with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        sink = Sink(work)
        try:
            results: dict[str, dict[tuple[int, int], Result]] = {"postfix": {}, "relay": {}}
            targets: list[Postfix | Relay] = []
            if args.only != "relay":
                targets.append(Postfix(work, sink.port))
            if args.only != "postfix":
                targets.append(Relay(work, sink.port, fsync=not args.no_fsync))
            for target in targets:
                with started(target):
                    for size, sessions in scenarios:
                        res = run_scenario(target, sink, size=size, sessions=sessions,
                                           count=counts[size], timeout=300)
                        results[target.name][(size, sessions)] = res
                        print(f"  {target.name:8} {size // 1024:4d} KB x{sessions:<3d} "
                              f"{res.rate:7.0f} msg/s  {res.cpu_per_msg * 1000:6.2f} ms CPU/msg"
                              f"  peak RSS {res.peak_mb:6.1f} MB", flush=True)
            for size, sessions in scenarios:
                rows.append((size, sessions, results["postfix"].get((size, sessions)),
                             results["relay"].get((size, sessions))))
        finally:
            sink.stop()
    print()
    print(f"{'scenario':<16}{'postfix msg/s':>14}{'relay msg/s':>13}{'ratio':>8}"
          f"{'postfix ms CPU':>16}{'relay ms CPU':>14}{'relay peak MB':>15}")
    for size, sessions, pf, rl in rows:
        ratio = f"{rl.rate / pf.rate:.2f}x" if pf and rl else "-"
        print(f"{f'{size // 1024} KB x{sessions}':<16}"
              f"{(f'{pf.rate:.0f}' if pf else '-'):>14}{(f'{rl.rate:.0f}' if rl else '-'):>13}"
              f"{ratio:>8}{(f'{pf.cpu_per_msg * 1000:.2f}' if pf else '-'):>16}"
              f"{(f'{rl.cpu_per_msg * 1000:.2f}' if rl else '-'):>14}"
              f"{(f'{rl.peak_mb:.0f}' if rl else '-'):>15}")
    print("\ntargets (issue 2): relay >= 1.0x postfix at 1 KB x20, >= 0.8x at 100 KB x20, "
          "peak memory < 150 MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
