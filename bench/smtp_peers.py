"""The SMTP bench's contestants: Postfix, Postfix + OpenDKIM, relay, each in its own cgroup.

Every contestant relays from ``smtp-source`` to one ``smtp-sink`` on loopback with its own
fsynced queue, and routes the recipient domain ``check.example`` to a second, dumping
sink, so the bench can read one real signed message from each and verify it before
timing anything. Each contestant's processes (Postfix's master and its children, the
OpenDKIM milter, relay's main and listener processes) run in one cgroup-v1 cpuacct group,
which gives CPU per message with everything included.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CG_CPU = Path("/sys/fs/cgroup/cpuacct")
DOMAIN, SELECTOR = "example.com", "bench"


def exit_on_sigterm() -> None:
    """Make SIGTERM (``kill``, ``timeout``) unwind like Ctrl-C, so the bench's ``finally``
    blocks stop its peers and remove its cgroups instead of leaving them running."""
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


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

    def pids(self) -> list[int]:
        return [int(p) for p in (self.cpu / "cgroup.procs").read_text().split()]

    def per_process_cpu(self) -> dict[str, Usage]:
        """CPU so far by process name, relay's split into its event-loop thread and its
        other threads (fsync and signing workers), for the breakdown."""
        out: dict[str, Usage] = {}
        for pid in self.pids():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                name = _process_name(stat, cmd)
                for task in Path(f"/proc/{pid}/task").iterdir():
                    part = name if not name.startswith("relay") else \
                        f"{name} {'loop' if task.name == str(pid) else 'threads'}"
                    out[part] = out.get(part, Usage()) + _usage(task)
        return out

    def peaks_by_process(self) -> list[tuple[str, float]]:
        """Each live process's peak resident set (VmHWM) in MB, for the breakdown."""
        out: list[tuple[str, float]] = []
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                status = Path(f"/proc/{pid}/status").read_text()
                hwm = next(int(line.split()[1]) for line in status.splitlines()
                           if line.startswith("VmHWM:"))
                out.append((_process_name(stat, cmd), hwm / 1024))
        return sorted(out)

    def pss_mb(self) -> float:
        """The group's memory now: the sum of its processes' proportional set size (PSS),
        which counts a page shared by n processes (the interpreter, libraries) 1/n in
        each, so the sum is what the group occupies."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, StopIteration):
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
                total += next(int(line.split()[1]) for line in text.splitlines()
                              if line.startswith("Pss:"))
        return total / 1024

    def peak_mb(self) -> float:
        """Sum of the peak resident set (VmHWM) of the group's live processes.

        The memory cgroup's own peak counts page cache (the spool files), which says
        nothing about the relay's footprint, so resident memory is read per process. Pages
        shared between processes count once per process here (an upper bound); see
        ``MemoryPeak`` for the sampled sum of PSS.
        """
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1])
        return total / 1024

    def remove(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                self.cpu.rmdir()
                break
            except OSError:
                time.sleep(0.1)


class MemoryPeak(threading.Thread):
    """Samples a group's PSS sum (``Cgroup.pss_mb``) every ``interval`` s; ``peak`` is the
    largest seen. The kernel keeps no peak of PSS, so it is sampled, from outside the
    group (its CPU is not the contestant's)."""

    def __init__(self, cg: Cgroup, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.cg, self.interval, self.peak = cg, interval, 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            with contextlib.suppress(OSError):         # the group is gone (stopped)
                self.peak = max(self.peak, self.cg.pss_mb())

    def stop(self) -> float:
        self._done.set()
        self.join()
        with contextlib.suppress(OSError):
            self.peak = max(self.peak, self.cg.pss_mb())
        return self.peak


@dataclass(frozen=True)
class Usage:
    """A process's or thread's CPU seconds (user and kernel) and context switches."""

    user: float = 0.0
    kernel: float = 0.0
    switches: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.user + other.user, self.kernel + other.kernel,
                     self.switches + other.switches)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(self.user - other.user, self.kernel - other.kernel,
                     self.switches - other.switches)

    @property
    def cpu(self) -> float:
        return self.user + self.kernel


def _usage(proc: Path) -> Usage:
    """A thread's (/proc/PID/task/TID) utime, stime and both kinds of context switch
    (it waited: voluntary; it was preempted: nonvoluntary)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    switches = sum(int(line.split()[1]) for line in (proc / "status").read_text().splitlines()
                   if "ctxt_switches:" in line)
    return Usage(int(fields[11]) / tick, int(fields[12]) / tick, switches)


def _process_name(stat: str, cmd: list[bytes]) -> str:
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    if b"relay.listenproc" in cmd:
        return "relay listener"
    if b"relay" in cmd and comm.startswith("python"):
        return "relay main"
    return comm


class Sink:
    """smtp-sink counting DATA completions; ``count()`` reads its running counter.

    With ``dump`` it writes each message to a file in that directory instead (slow: only
    for the few messages the bench verifies).
    """

    def __init__(self, work: Path, *, dump: Path | None = None) -> None:
        self.port = free_port()
        self.dump = dump
        self.out = work / f"sink-{self.port}.out"
        argv = ["smtp-sink", "-u", "nobody"]
        if dump is not None:
            dump.mkdir(mode=0o777)
            os.chmod(dump, 0o777)
            argv += ["-d", f"{dump}/%M."]
        argv += ["-c", f"127.0.0.1:{self.port}", "1024"]
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_port(self.port)

    def count(self) -> int:
        found = re.findall(rb"mesg=(\d+)", self.out.read_bytes()[-128:])
        return int(found[-1]) if found else 0

    def messages(self) -> list[bytes]:
        assert self.dump is not None
        return [p.read_bytes() for p in sorted(self.dump.rglob("*")) if p.is_file()]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


@dataclass
class Sinks:
    bench: Sink                 # counts the timed messages
    check: Sink                 # keeps the verification messages (recipient check.example)


class Postfix:
    """A private Postfix relay; with ``milter`` it signs through OpenDKIM."""

    def __init__(self, work: Path, name: str, sinks: Sinks, *, milter: OpenDkim | None = None
                 ) -> None:
        self.name = name
        self.milter = milter
        self.dir = work / name
        conf, queue, data = self.dir / "conf", self.dir / "queue", self.dir / "data"
        for d in (conf, queue, data):
            d.mkdir(parents=True)
        shutil.chown(data, "postfix")
        self.port = free_port()
        master = Path("/etc/postfix/master.cf").read_text().splitlines()
        master = [f"127.0.0.1:{self.port} inet n - n - - smtpd"
                  if line.startswith("smtp      inet") else line for line in master]
        (conf / "master.cf").write_text("\n".join(master) + "\n")
        (conf / "transport").write_text(f"check.example smtp:[127.0.0.1]:{sinks.check.port}\n")
        milters = ""
        if milter is not None:
            milters = (f"smtpd_milters = unix:{milter.socket}\n"
                       "non_smtpd_milters = $smtpd_milters\n"
                       "milter_default_action = tempfail\n")
        (conf / "main.cf").write_text(f"""compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
myhostname = bench.localdomain
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{sinks.bench.port}
transport_maps = texthash:{conf / 'transport'}
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
smtp_tls_security_level = none
default_destination_concurrency_limit = 20
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
{milters}""")
        self.conf = conf
        self.cg = Cgroup(f"relaybench-{name}-{os.getpid()}")

    def start(self) -> None:
        if self.milter is not None:
            self.milter.start(self.cg)
        subprocess.run(self.cg.wrap(["postfix", "-c", str(self.conf), "start"]), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if self.milter is not None:
            self.milter.stop()
        self.cg.remove()


class OpenDkim:
    """Debian's OpenDKIM as a milter: RSA-2048, relaxed/relaxed, signs mail from loopback."""

    def __init__(self, work: Path, key_pem: bytes) -> None:
        if shutil.which("opendkim") is None:
            raise SystemExit("opendkim is missing: apt-get install -y opendkim opendkim-tools")
        self.dir = work / "opendkim"
        self.dir.mkdir()
        key = self.dir / "bench.private"
        key.write_bytes(key_pem)
        key.chmod(0o600)
        # A Unix socket, as Debian's packaging sets it up (over loopback TCP the milter
        # protocol's small writes meet delayed ACKs: ~90 ms per message in one session).
        self.socket = self.dir / "opendkim.sock"
        self.conf = self.dir / "opendkim.conf"
        self.conf.write_text(f"""Syslog no
Mode s
Domain {DOMAIN}
Selector {SELECTOR}
KeyFile {key}
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
Socket local:{self.socket}
InternalHosts 127.0.0.1
PidFile {self.dir / 'opendkim.pid'}
RequireSafeKeys false          # the bench key lives under /tmp
UMask 000                      # Postfix (user postfix) connects to the socket
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, cg: Cgroup) -> None:
        with open(self.dir / "opendkim.log", "wb") as log:
            self.proc = subprocess.Popen(cg.wrap(["opendkim", "-f", "-x", str(self.conf)]),
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"opendkim did not start: see {self.dir / 'opendkim.log'}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Relay:
    """relay with a production-like config: metrics on, default listener limits.

    Only the upstream's concurrency is set, to Postfix's default destination concurrency
    (20), so both sides deliver over as many connections.
    """

    def __init__(self, work: Path, name: str, sinks: Sinks, *, key_pem: bytes | None = None,
                 fsync: bool = True, extra: str = "") -> None:
        self.name = name
        self.dir = work / name
        self.dir.mkdir()
        self.port = free_port()
        self.config = self.dir / "relay.toml"
        dkim = ""
        if key_pem is not None:
            key = self.dir / "dkim.key"
            key.write_bytes(key_pem)
            key.chmod(0o600)
            dkim = f'[[dkim]]\ndomain = "{DOMAIN}"\nselector = "{SELECTOR}"\nkey_file = "{key}"\n'
        self.config.write_text(f"""[relay]
hostname = "bench.localdomain"
spool = "{self.dir / 'spool'}"
default_upstream = "sink"
fsync = {'true' if fsync else 'false'}
{extra}
[metrics]
listen = "127.0.0.1:{free_port()}"

[[listener]]
name = "bench"
protocol = "smtp"
listen = "127.0.0.1:{self.port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "sink"
protocol = "smtp"
host = "127.0.0.1"
port = {sinks.bench.port}
tls = "none"
max_connections = 20

[[upstream]]
name = "check"
protocol = "smtp"
host = "127.0.0.1"
port = {sinks.check.port}
tls = "none"

[[route]]
recipient_domain = "check.example"
upstream = "check"

{dkim}""")
        self.cg = Cgroup(f"relaybench-{name}-{os.getpid()}")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "relay.log", "wb") as log:
            self.proc = subprocess.Popen(
                self.cg.wrap([sys.executable, "-m", "relay", "run", "-c", str(self.config)]),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(
                    p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)})
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.cg.remove()


Target = Postfix | Relay
