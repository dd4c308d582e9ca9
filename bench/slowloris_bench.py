"""Slow senders vs a newcomer: how many addresses it takes to lock out a legitimate client.

Attackers from N loopback addresses open up to 20 sessions each (the per-client limit of
both servers), walk each to DATA and then hold it with one byte sent (a slow sender: the
idle timers never fire during the measurement). Then a legitimate client from another
address tries to send one message. Printed side by side for relay and for a private
Postfix with anvil limits and its DATA deadline, for growing N:

- relay: its shipped defaults (max_connections 200, max_connections_per_client 20,
  reserved_connections 20 = a tenth, data_deadline 10m, min_data_rate 500). Only the
  listen address, the allow-list (loopback), the upstream (smtp-sink) and the spool are
  set; the metrics endpoint is off (it would collide with other relays on the host and
  plays no part in admission).
- Postfix 3.7 hardened the documented way: 200 smtpd processes (the same 200 slots),
  smtpd_client_connection_count_limit = 20 (anvil, per client), the loopback exemption
  smtpd_client_event_limit_exceptions emptied so anvil applies to the attackers,
  smtpd_per_record_deadline = yes with smtpd_min_data_rate = 500 (its DATA deadline).

A newcomer is "locked out" when it gets no greeting within 20 s (Postfix: it waits in the
listen backlog behind busy processes) or is refused with 421 (relay). An attacker's
session is "held" once in DATA, "refused" on a 421, "waiting" with no greeting in 2 s
(queued in the backlog); after three waiting in a row the server is full and the rest
of that scenario's attempts are not made.

    python bench/slowloris_bench.py                # N = 5, 10, 15, 20, 25, 28, 29, 30
    python bench/slowloris_bench.py --addresses 10 29 --only relay

Needs root (Postfix's master, smtp-sink -u) and Debian's postfix package.
"""

from __future__ import annotations

import argparse
import contextlib
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smtp_peers import free_port, wait_port  # noqa: E402  (a sibling script's helpers)

PER_ADDRESS = 20
NEWCOMER_TIMEOUT = 20.0


class Sink:
    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


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
        master = [f"127.0.0.1:{self.port} inet n - n - 200 smtpd"
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
maillog_file = {self.dir}/maillog
maillog_file_prefixes = {self.dir}
default_process_limit = 200
smtpd_client_connection_count_limit = {PER_ADDRESS}
smtpd_client_event_limit_exceptions =
smtpd_per_record_deadline = yes
smtpd_min_data_rate = 500
""")
        self.conf = conf

    def start(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.conf), "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30                 # the master waits for its children
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), 0.2):
                time.sleep(0.2)
                continue
            break


class Relay:
    name = "relay"

    def __init__(self, work: Path, sink_port: int) -> None:
        self.dir = work / "relay"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.config = self.dir / "relay.toml"
        self.config.write_text(f"""[relay]
hostname = "bench.localdomain"
spool = "{self.dir / 'spool'}"
default_upstream = "sink"

[metrics]
enabled = false

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
port = {sink_port}
tls = "none"
""")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.dir / "relay.log", "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", "-c", str(self.config)], cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """A line-level SMTP client on a blocking socket from a chosen loopback address."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(source, 0))
        self.buf = b""

    def reply(self, timeout: float) -> str | None:
        """The next whole reply, or None when none came within ``timeout``."""
        self.sock.settimeout(timeout)
        lines = []
        try:
            while True:
                while b"\r\n" not in self.buf:
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        return "closed"
                    self.buf += chunk
                line, self.buf = self.buf.split(b"\r\n", 1)
                lines.append(line.decode(errors="replace"))
                if len(line) < 4 or line[3:4] != b"-":
                    return lines[-1]
        except (TimeoutError, ConnectionError):
            return None

    def cmd(self, line: bytes, timeout: float = 10.0) -> str | None:
        self.sock.sendall(line + b"\r\n")
        return self.reply(timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def slow_sender(port: int, source: str) -> tuple[str, Client]:
    """Open a session and hold it in DATA: ("held" | "refused" | "waiting", client)."""
    c = Client(port, source)
    greeting = c.reply(2.0)
    if greeting is None:
        return "waiting", c                         # in the backlog: it will take a slot
    if not greeting.startswith("220"):
        return "refused", c
    for line in (b"EHLO slow.example", b"MAIL FROM:<a@example.com>",
                 b"RCPT TO:<b@example.net>", b"DATA"):
        r = c.cmd(line)
        if r is None or r[:1] not in "23":
            return "refused", c
    c.sock.sendall(b"S")                            # one byte of the message, then nothing
    return "held", c


def newcomer(port: int) -> str:
    started = time.monotonic()
    c = Client(port, "127.0.2.1")
    try:
        greeting = c.reply(NEWCOMER_TIMEOUT)
        if greeting is None:
            return f"locked out: no greeting in {NEWCOMER_TIMEOUT:.0f} s"
        if not greeting.startswith("220"):
            return f"locked out: {greeting[:40]}"
        for line in (b"EHLO legit.example", b"MAIL FROM:<agent@example.com>",
                     b"RCPT TO:<customer@example.net>", b"DATA"):
            r = c.cmd(line)
            if r is None or r[:1] not in "23":
                return f"refused at {line.split()[0].decode()}: {r}"
        # A well-formed message: relay's structure checks refuse one without From:.
        r = c.cmd(b"From: agent@example.com\r\nTo: customer@example.net\r\n"
                  b"Subject: legit\r\n\r\nhello\r\n.")
        if r is None or not r.startswith("250"):
            return f"refused at end of data: {r}"
        return f"sent in {time.monotonic() - started:.2f} s"
    finally:
        c.close()


@dataclass
class Outcome:
    held: int
    refused: int
    waiting: int
    newcomer: str


def scenario(target: Postfix | Relay, addresses: int) -> Outcome:
    clients: list[Client] = []
    counts = {"held": 0, "refused": 0, "waiting": 0}
    streak = 0
    try:
        for a in range(1, addresses + 1):
            for _ in range(PER_ADDRESS):
                if streak >= 3:                     # the server is full and queues: enough
                    break
                state, c = slow_sender(target.port, f"127.0.1.{a}")
                counts[state] += 1
                streak = streak + 1 if state == "waiting" else 0
                if state == "refused":
                    c.close()
                else:
                    clients.append(c)
        return Outcome(counts["held"], counts["refused"], counts["waiting"],
                       newcomer(target.port))
    finally:
        for c in clients:
            c.close()


@contextlib.contextmanager
def started(target: Postfix | Relay) -> Iterator[Postfix | Relay]:
    target.start()
    try:
        yield target
    finally:
        target.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--addresses", type=int, nargs="+",
                    default=[5, 10, 15, 20, 25, 28, 29, 30],
                    help="attacking addresses to try (each holds up to 20 sessions)")
    ap.add_argument("--only", choices=["relay", "postfix"], help="run one side only")
    args = ap.parse_args()
    results: dict[tuple[str, int], Outcome] = {}
    with tempfile.TemporaryDirectory(prefix="relay-slowloris-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)                           # Postfix's daemons must reach their queue
        sink = Sink(work)
        try:
            for n in args.addresses:
                for cls in (Relay, Postfix):
                    if args.only and cls.name != args.only:
                        continue
                    target = cls(work / f"{cls.name}-{n}", sink.port)
                    with started(target):
                        results[(cls.name, n)] = scenario(target, n)
                    print(f"  {cls.name:8} {n:3} addresses: {results[(cls.name, n)]}",
                          file=sys.stderr, flush=True)
        finally:
            sink.stop()
    sides = [s for s in ("relay", "postfix") if not args.only or s == args.only]
    print(f"\nSlow-DATA sessions from N addresses ({PER_ADDRESS} each), then one newcomer;"
          " 200 slots, 20 per client\n")
    print(f"{'N':>3} {'attempts':>8} | " + " | ".join(
        f"{s + ': held/refused/waiting':<28} {'newcomer':<36}" for s in sides))
    for n in args.addresses:
        row = [f"{o.held:>4} /{o.refused:>4} /{o.waiting:>4}{'':<14} {o.newcomer[:36]:<36}"
               for o in (results[(s, n)] for s in sides)]
        print(f"{n:>3} {n * PER_ADDRESS:>8} | " + " | ".join(row))
    for s in sides:
        locked = [n for n in args.addresses if not results[(s, n)].newcomer.startswith("sent")]
        print(f"{s}: a newcomer is locked out from {min(locked)} addresses on" if locked
              else f"{s}: the newcomer got in at every N tried")
    return 0


if __name__ == "__main__":
    sys.exit(main())
