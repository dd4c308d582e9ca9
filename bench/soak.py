"""A bounded soak: mail for a fixed time through faults and a kill -9, then the books.

Platform clients submit to the real relay process for ``--seconds``; a middlebox between
relay and its upstream (Postfix's smtp-sink) injects random faults into the upstream
sessions, ``--faults-per-second`` on average: drops and resets at every stage, 421/451
replies, stalls, and the connection lost after the data (which may duplicate). Halfway,
relay's main process is killed with SIGKILL and started again. Then the faults stop and
the queue drains.

Printed: the accounting (acknowledged = delivered, nothing lost; copies beyond the first
listed apart, next to the unknown outcomes relay counted), and relay's memory (RSS) and
open descriptors sampled through the run, main process and SMTP listener process, with
the growth from the first sample after warm-up to the last of each life of the process
(the last sample is taken after the drain).

    python bench/soak.py                  # 120 s, 4 clients, 40 msg/s, a fault a second
    python bench/soak.py --seconds 600 --clients 8 --faults-per-second 3
    python bench/soak.py --rate 0         # flat out: the backlog (and memory) grows

Settings relay runs with: the shipped defaults (conf/relay.example.toml), except the
listener/upstream addresses and spool path of this run, and three delays that only
decide how long a failure waits, not the work done per message: [relay.retry] first =
"1s", max = "5s" (defaults 1m / 30m: a faulted message would wait past the run), and
the upstream's connect/command/data timeouts "3s" (defaults 30s/5m/10m: one stall would
hold a connection slot for ten minutes). Needs root (smtp-sink -u) and Debian's postfix.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.faults.proxy import FaultProxy, Rule  # noqa: E402
from tests.peers import free_port, wait_for_port  # noqa: E402

# (event, action, text): what a faulted upstream connection suffers; "drop_after" at
# "dot" loses the reply to a message the upstream took (an unknown outcome).
FAULTS = [("connect", "drop", ""), ("connect", "rst", ""), ("greeting", "reply", "421 4.3.2 busy"),
          ("EHLO", "drop", ""), ("MAIL", "reply", "451 4.3.0 try later"),
          ("RCPT", "reply", "450 4.2.1 busy"), ("RCPT", "drop_after", ""),
          ("DATA", "reply", "451 4.3.0 try later"), ("DATA", "rst", ""), ("body", "drop", ""),
          ("dot", "reply", "451 4.3.0 try later"), ("dot", "drop_after", ""),
          ("MAIL", "stall", "")]


@dataclass
class Books:
    acked: set[str] = field(default_factory=set)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def config(spool: Path, port: int, upstream: int, metrics: int) -> str:
    return f"""[relay]
hostname = "relay.soak"
spool = "{spool}"
default_upstream = "sink"

[relay.retry]
first = "1s"
max = "5s"

[metrics]
listen = "127.0.0.1:{metrics}"

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "sink"
protocol = "smtp"
host = "127.0.0.1"
port = {upstream}
tls = "none"
connect_timeout = "3s"
command_timeout = "3s"
data_timeout = "3s"
"""


def start_relay(work: Path, log: Path, port: int) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "-c",
                                 str(work / "relay.toml")], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    wait_for_port("127.0.0.1", port, proc=proc, log=log, timeout=60)
    return proc


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
    return out


def usage(pid: int) -> tuple[float, int]:
    """(RSS in MB, open descriptors) of a process, or (0, 0) if it is gone."""
    try:
        rss = next(int(line.split()[1]) for line in
                   Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    except (OSError, StopIteration):
        return 0.0, 0
    return rss / 1024, fds


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def client(port: int, books: Books, stop: threading.Event, k: int, every: float) -> None:
    """Submit one message every ``every`` seconds (or as fast as relay answers, if 0)."""
    n = 0
    next_at = time.monotonic()
    while not stop.is_set():
        if every:
            next_at += every
            if stop.wait(max(0.0, next_at - time.monotonic())):
                return
        subject = f"soak-{k}-{n}"
        n += 1
        msg = (f"From: agent@example.com\r\nTo: customer@example.net\r\nSubject: {subject}"
               f"\r\nMessage-ID: <{subject}@soak>\r\n\r\n" + "hello soak\r\n" * 40).encode()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                c.sendmail("agent@example.com", ["customer@example.net"], msg)
            with books.lock:
                books.acked.add(subject)
        except (smtplib.SMTPException, OSError):
            with books.lock:
                books.refused += 1
            time.sleep(0.05)              # relay is restarting: do not spin


def chaos(proxy: FaultProxy, per_second: float, stop: threading.Event,
          rng: random.Random) -> None:
    """Arm a random fault at random moments, ``per_second`` on average (at most 3 waiting)."""
    while not stop.wait(rng.expovariate(per_second)):
        if proxy.armed < 3:
            at, do, text = rng.choice(FAULTS)
            proxy.arm(Rule(at, do, text))


def delivered(dump: Path) -> collections.Counter[str]:
    found: collections.Counter[str] = collections.Counter()
    for p in dump.iterdir():
        data = p.read_bytes()
        if b"by smtp-sink (smtp-sink)" not in data:
            continue                       # a transaction cut before DATA: not a delivery
        m = re.search(rb"\nSubject: (soak-\d+-\d+)\n", data)
        if m:
            found[m.group(1).decode()] += 1
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--faults-per-second", type=float, default=1.0)
    ap.add_argument("--rate", type=float, default=40.0,
                    help="messages per second from all clients together (0: flat out); "
                         "the default stays below what relay delivers through the faults, "
                         "so the queue is steady and memory can be judged")
    ap.add_argument("--seed", type=int, default=14)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    dump = Path(tempfile.mkdtemp(prefix="relay-soak-dump-"))   # smtp-sink writes as nobody
    dump.chmod(0o777)
    sink_port, port, mport = free_port(), free_port(), free_port()
    sink = subprocess.Popen(["smtp-sink", "-u", "nobody", "-d", f"{dump}/%M.",
                             f"127.0.0.1:{sink_port}", "256"], start_new_session=True)
    wait_for_port("127.0.0.1", sink_port, proc=sink)
    books, stop, stop_chaos = Books(), threading.Event(), threading.Event()
    log = work / "relay.log"
    samples: list[tuple[float, int, float, int, float, int, float]] = []
    unknown = 0.0
    t0 = time.monotonic()
    try:
        with FaultProxy(sink_port) as proxy:
            (work / "relay.toml").write_text(config(work / "spool", port, proxy.port, mport))
            relay = start_relay(work, log, port)
            life = 1
            every = args.clients / args.rate if args.rate else 0.0
            threads = [threading.Thread(target=client, args=(port, books, stop, k, every))
                       for k in range(args.clients)]
            threads.append(threading.Thread(target=chaos, args=(
                proxy, args.faults_per_second, stop_chaos, random.Random(args.seed))))
            for t in threads:
                t.start()
            killed = False
            while (elapsed := time.monotonic() - t0) < args.seconds:
                if not killed and elapsed >= args.seconds / 2:
                    unknown += metric(mport, "relay_delivery_outcome_unknown_total")
                    relay.send_signal(signal.SIGKILL)
                    relay.wait()
                    killed, life = True, 2
                    print(f"[{elapsed:6.1f}s] kill -9 of relay (pid {relay.pid}); "
                          "starting it again", flush=True)
                    relay = start_relay(work, log, port)
                kids = children(relay.pid)
                rss, fds = usage(relay.pid)
                crss, cfds = usage(kids[0]) if kids else (0.0, 0)
                queued = metric(mport, "relay_queue_messages")
                samples.append((elapsed, life, rss, fds, crss, cfds, queued))
                time.sleep(5)
            stop.set()
            for t in threads[:-1]:
                t.join(60)
            stop_chaos.set()
            threads[-1].join(10)
            proxy.disarm()
            drain_started = time.monotonic()
            while time.monotonic() - drain_started < 180:
                got = delivered(dump)
                if books.acked <= set(got) and metric(mport, "relay_queue_messages") == 0:
                    break
                time.sleep(1)
            drained = time.monotonic() - drain_started
            kids = children(relay.pid)
            rss, fds = usage(relay.pid)
            crss, cfds = usage(kids[0]) if kids else (0.0, 0)
            samples.append((time.monotonic() - t0, life, rss, fds, crss, cfds,
                            metric(mport, "relay_queue_messages")))
            unknown += metric(mport, "relay_delivery_outcome_unknown_total")
            relay.send_signal(signal.SIGTERM)
            code = relay.wait(60)
    finally:
        sink.terminate()
        sink.wait(10)
    got = delivered(dump)
    fired = ", ".join(f"{n} {k}" for k, n in collections.Counter(proxy.fired).most_common())
    lost = books.acked - set(got)
    unacked = set(got) - books.acked
    extra = sum(n - 1 for n in got.values())
    print(f"\nsoak: {args.seconds:.0f} s, {args.clients} clients, "
          f"{f'{args.rate:g} msg/s' if args.rate else 'flat out'}, {len(proxy.fired)} faults "
          f"injected ({fired}), kill -9 at {args.seconds / 2:.0f} s; "
          f"relay exited {code} after draining in {drained:.1f} s")
    print(f"  acknowledged          {len(books.acked)}")
    print(f"  delivered             {len(set(got) & books.acked)} of them"
          f"   lost: {len(lost)}")
    print(f"  refused/failed        {books.refused} (not acknowledged: clients retry)")
    print(f"  delivered, never acknowledged: {len(unacked)}")
    print(f"  copies beyond the first: {extra}   unknown outcomes counted by relay: "
          f"{unknown:.0f} (a kill -9 after the data went out adds uncounted ones)")
    print("\n  time   life  main RSS MB  main fds  listener RSS MB  listener fds  queued")
    for s in samples:
        print(f"  {s[0]:5.0f}s  {s[1]:>4}  {s[2]:11.1f}  {s[3]:8d}  {s[4]:15.1f}  "
              f"{s[5]:12d}  {s[6]:6.0f}")
    for life in (1, 2):
        mine = [s for s in samples if s[1] == life]
        if len(mine) < 3:
            continue
        first, last = mine[1], mine[-1]            # the first sample is warm-up
        print(f"  life {life}: main RSS {first[2]:.1f} -> {last[2]:.1f} MB "
              f"({last[2] - first[2]:+.1f}), fds {first[3]} -> {last[3]}; listener RSS "
              f"{first[4]:.1f} -> {last[4]:.1f} MB ({last[4] - first[4]:+.1f}), "
              f"fds {first[5]} -> {last[5]}")
    text = log.read_text(errors="replace")
    print(f"\n  relay's log: {work / 'relay.log'} ({text.count('Traceback')} tracebacks, "
          f"{text.count(': ERROR: ')} ERROR lines)")
    ok = not lost and code == 0 and "Traceback" not in text
    shutil.rmtree(dump, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
