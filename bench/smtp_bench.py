"""End-to-end SMTP relay bench: Postfix, Postfix + OpenDKIM, relay, relay + DKIM, side by side.

All four contestants (``bench/smtp_peers.py``) run in the same invocation, accept from
Postfix's ``smtp-source`` and deliver to one ``smtp-sink`` on loopback, each with its own
fsynced queue. DKIM is RSA-2048, relaxed/relaxed, the same key on both sides: Debian's
OpenDKIM as Postfix's milter, relay's own signer. Before timing, one message through each
contestant is fetched from a dumping sink and its signature checked with dkimpy (signed
by exactly the two DKIM contestants, unsigned by the others).

For each scenario (1 KB x 20 sessions, 100 KB x 20, 1 KB x 1) and repetition (3, the
contestants' order rotating) the bench sends N messages and waits until the sink has
counted all N deliveries. It prints the median messages/s, CPU milliseconds per message
(the cgroup around each contestant: Postfix's processes and the milter, relay's main and
listener processes), cores kept busy (CPU seconds / wall seconds), peak memory, and the
ratios the issue sets targets for.

    python bench/smtp_bench.py                 # the full run (about 15 minutes)
    python bench/smtp_bench.py --quick         # fewer messages, one repetition (smoke run)
    python bench/smtp_bench.py --breakdown     # also relay's CPU by process and thread

The breakdown gives, per message, each part's CPU, the share of it spent in the kernel
(syscalls, the filesystem's fsync work, TCP on loopback) and its context switches (each
a sleep and a wakeup: a disk wait, an idle event loop, a thread handing the GIL over),
which is where relay pays beyond its own Python.

Needs root (cgroups, smtp-sink -u) and Debian's postfix, opendkim and opendkim-tools
(``apt-get install -y postfix opendkim opendkim-tools``). Take figures on a quiet machine:
``uptime`` under 1.0 on the 2-core reference VM; the load is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dkim
from smtp_peers import (
    DOMAIN,
    SELECTOR,
    MemoryPeak,
    OpenDkim,
    Postfix,
    Relay,
    Sink,
    Sinks,
    Target,
    Usage,
    exit_on_sigterm,
)

from relay.dkim.keys import generate, private_pem, txt_record

SCENARIOS = [(1024, 20), (100 * 1024, 20), (1024, 1)]
NAMES = ["postfix", "postfix+opendkim", "relay", "relay+dkim"]


@dataclass
class Run:
    rate: float
    cpu_ms: float
    busy: float                 # cores: CPU seconds per wall second
    by_process: dict[str, Usage] = field(default_factory=dict)   # per message


def per_message(used: Usage, count: int) -> Usage:
    """``used`` over ``count`` messages: milliseconds, and switches per message."""
    return Usage(used.user * 1000 / count, used.kernel * 1000 / count, used.switches / count)


def settle(limit_kb: int = 4096, timeout: float = 15.0) -> None:
    """Write back what the previous contestant left dirty before timing the next, so that
    no one pays for another's queue files (all share one disk and one journal)."""
    os.sync()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = Path("/proc/meminfo").read_text()
        info = dict(line.split(":", 1) for line in text.splitlines())
        if int(info["Dirty"].split()[0]) + int(info["Writeback"].split()[0]) < limit_kb:
            return
        time.sleep(0.1)


def run_scenario(target: Target, sink: Sink, *, size: int, sessions: int, count: int,
                 timeout: float) -> Run:
    settle()
    base = sink.count()
    cpu0 = target.cg.cpu_seconds()
    proc0 = target.cg.per_process_cpu()
    t0 = time.monotonic()
    src = subprocess_run(["smtp-source", "-s", str(sessions), "-m", str(count), "-l",
                          str(size), "-f", f"bench@{DOMAIN}", "-t", "sink@example.net",
                          "-M", "bench.localdomain", f"127.0.0.1:{target.port}"], timeout)
    if src:
        log = getattr(target, "dir", Path("/nonexistent")) / "relay.log"
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:]) \
            if log.exists() else ""
        raise RuntimeError(f"smtp-source against {target.name} failed: {src}\n{tail}")
    deadline = t0 + timeout
    while sink.count() - base < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target.name}: only {sink.count() - base}/{count} delivered "
                               f"within {timeout}s")
        time.sleep(0.01)
    elapsed = time.monotonic() - t0
    cpu = target.cg.cpu_seconds() - cpu0
    proc1 = target.cg.per_process_cpu()
    used = {name: proc1[name] - proc0.get(name, Usage()) for name in proc1}
    by_process = {name: per_message(u, count) for name, u in used.items() if u.cpu > 0}
    return Run(count / elapsed, cpu * 1000 / count, cpu / elapsed, by_process)


def subprocess_run(argv: list[str], timeout: float) -> str:
    """Run ``argv``; its stderr if it failed, else an empty string."""
    proc = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    return "" if proc.returncode == 0 else proc.stderr.decode(errors="replace")


def verify_signing(targets: list[Target], check: Sink, record: bytes) -> None:
    """One message through each contestant: signed by exactly the DKIM ones, and valid."""
    for t in targets:
        with smtplib.SMTP("127.0.0.1", t.port, timeout=30) as s:
            s.sendmail(f"bench@{DOMAIN}", [f"{t.name}@check.example"],
                       f"From: <bench@{DOMAIN}>\r\nTo: <{t.name}@check.example>\r\n"
                       f"Subject: which one signs\r\nDate: Sun, 6 Dec 2026 07:58:44 +0000\r\n"
                       f"Message-Id: <check.{t.name}@{DOMAIN}>\r\n\r\nchecked   body \r\n"
                       "\r\n\r\n")
    def complete(msg: bytes) -> bool:             # smtp-sink may still be writing it
        return msg.endswith(b"\n") and any(
            f"<{t.name}@check.example>".encode() in msg for t in targets)

    deadline = time.monotonic() + 60
    while not (len(got := check.messages()) >= len(targets) and all(map(complete, got))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {sum(map(complete, got))}/{len(targets)} check messages")
        time.sleep(0.05)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return record if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else b""

    for msg in check.messages():
        who = next(t for t in targets if f"<{t.name}@check.example>".encode() in msg)
        sigs = msg.count(b"\nDKIM-Signature:") + msg.startswith(b"DKIM-Signature:")
        want = 1 if "dkim" in who.name else 0
        # smtp-sink prepends X-* lines and its own Received: the signature covers neither.
        if sigs != want or (want and not dkim.verify(msg, dnsfunc=dns)):
            raise SystemExit(f"{who.name}: {sigs} DKIM signature(s), want {want} valid; "
                             f"message:\n{msg.decode(errors='replace')}")
    print(f"checked: {', '.join(t.name for t in targets if 'dkim' in t.name)} sign "
          "(dkimpy verifies); the others do not", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages, one repetition")
    ap.add_argument("--reps", type=int, default=0, help="repetitions (default 3, quick 1)")
    ap.add_argument("--only", action="append", choices=NAMES,
                    help="run only this contestant (repeatable)")
    ap.add_argument("--messages", type=int, default=0, help="messages per 1 KB run (100 KB "
                    "runs send half); default 3000, quick 300")
    ap.add_argument("--scenario", action="append", metavar="KB:SESSIONS",
                    help="run only this scenario, e.g. 1:20 (repeatable; default all)")
    ap.add_argument("--breakdown", action="store_true",
                    help="relay's CPU per process and thread, kernel share, context switches")
    ap.add_argument("--relay-extra", default="", help="lines added to relay's [relay] "
                    "section, e.g. 'smtp_processes = 2' (for locating bottlenecks)")
    args = ap.parse_args()
    exit_on_sigterm()
    if os.geteuid() != 0:
        print("bench/smtp_bench.py needs root (cgroups, smtp-sink -u)", file=sys.stderr)
        return 2
    reps = args.reps or (1 if args.quick else 3)
    small = args.messages or (300 if args.quick else 3000)
    counts = {1024: small, 100 * 1024: small // 2}
    names = args.only or NAMES
    scenarios = [(int(kb) * 1024, int(n)) for kb, n in
                 (x.split(":") for x in args.scenario)] if args.scenario else SCENARIOS
    key = generate("rsa", 2048)
    pem, record = private_pem(key), txt_record(key).encode()
    load0 = os.getloadavg()
    results: dict[tuple[str, int, int], list[Run]] = {}
    peaks: dict[str, float] = {}                  # sampled peak of the PSS sum
    hwm: dict[str, float] = {}                    # sum of each process's own peak (VmHWM)
    samplers: dict[str, MemoryPeak] = {}
    with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        sinks = Sinks(Sink(work), Sink(work, dump=work / "checked"))
        factories = {
            "postfix": lambda: Postfix(work, "postfix", sinks),
            "postfix+opendkim": lambda: Postfix(work, "postfix+opendkim", sinks,
                                                milter=OpenDkim(work, pem)),
            "relay": lambda: Relay(work, "relay", sinks, extra=args.relay_extra),
            "relay+dkim": lambda: Relay(work, "relay+dkim", sinks, key_pem=pem,
                                        extra=args.relay_extra),
        }
        targets: list[Target] = []
        try:
            for name in names:
                target = factories[name]()
                targets.append(target)
                target.start()
                samplers[name] = MemoryPeak(target.cg)
                samplers[name].start()
            verify_signing(targets, sinks.check, record)
            for t in targets:                 # warm-up: pools, imports, page cache
                run_scenario(t, sinks.bench, size=1024, sessions=20, count=100, timeout=120)
            for rep in range(reps):
                order = targets[rep % len(targets):] + targets[:rep % len(targets)]
                for size, sessions in scenarios:
                    for t in order:
                        r = run_scenario(t, sinks.bench, size=size, sessions=sessions,
                                         count=counts[size], timeout=600)
                        results.setdefault((t.name, size, sessions), []).append(r)
                        print(f"  rep {rep + 1} {t.name:17} {size // 1024:4d} KB x{sessions:<3d}"
                              f"{r.rate:7.0f} msg/s {r.cpu_ms:6.2f} ms CPU/msg "
                              f"{r.busy:4.2f} cores busy", flush=True)
                        if args.breakdown and t.name.startswith("relay"):
                            for k, v in sorted(r.by_process.items()):
                                print(f"      {k:22} {v.cpu:5.2f} ms CPU/msg, in the kernel "
                                      f"{v.kernel:4.2f}, {v.switches:4.1f} context switches")
            for t in targets:
                peaks[t.name] = samplers[t.name].stop()
                hwm[t.name] = t.cg.peak_mb()
                if args.breakdown and t.name.startswith("relay"):
                    print(f"  {t.name} peak resident MB: " + ", ".join(
                        f"{n} {mb:.0f}" for n, mb in t.cg.peaks_by_process()))
        finally:
            for t in targets:
                t.stop()
            sinks.bench.stop()
            sinks.check.stop()
    report(results, peaks, hwm, names, reps, load0, os.getloadavg())
    return 0


def report(results: dict[tuple[str, int, int], list[Run]], peaks: dict[str, float],
           hwm: dict[str, float], names: list[str], reps: int, load0: tuple[float, float, float],
           load1: tuple[float, float, float]) -> None:
    def med(name: str, size: int, sessions: int, what: str) -> float | None:
        runs = results.get((name, size, sessions))
        return statistics.median(getattr(r, what) for r in runs) if runs else None

    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    print(f"\nmedians of {reps}; load average {load0[0]:.2f} before, {load1[0]:.2f} after, "
          f"{os.cpu_count()} CPUs; fsync on everywhere")
    if max(load0[0], load1[0]) > 1.0:
        print("the machine was busy (load average above 1.0): msg/s and cores busy are not "
              "comparable with a quiet run; CPU per message is the steadier figure")
    print(f"{'scenario':<13}{'contestant':<18}{'msg/s':>8}{'CPU ms/msg':>12}{'cores busy':>12}"
          f"{'peak MB':>9}{'HWM sum':>9}")
    for size, sessions in SCENARIOS:
        for name in names:
            print(f"{f'{size // 1024} KB x{sessions}':<13}{name:<18}"
                  f"{fmt(med(name, size, sessions, 'rate'), '.0f'):>8}"
                  f"{fmt(med(name, size, sessions, 'cpu_ms'), '.2f'):>12}"
                  f"{fmt(med(name, size, sessions, 'busy'), '.2f'):>12}"
                  f"{fmt(peaks.get(name), '.0f'):>9}{fmt(hwm.get(name), '.0f'):>9}")
    print("(peak MB: the largest sum of the contestant's PSS, sampled every 0.2 s: shared "
          "pages counted once; HWM sum: each process's own peak RSS added up, shared pages "
          "once per process)")
    print(f"\n{'scenario':<13}{'relay/postfix':>15}{'CPU ratio':>11}{'relay+dkim/':>13}"
          f"{'CPU ratio':>11}{'DKIM adds':>11}")
    print(f"{'':<13}{'msg/s':>15}{'':>11}{'pf+opendkim':>13}{'':>11}{'ms CPU':>11}")
    for size, sessions in SCENARIOS:
        r, p = med("relay", size, sessions, "rate"), med("postfix", size, sessions, "rate")
        rd = med("relay+dkim", size, sessions, "rate")
        pd = med("postfix+opendkim", size, sessions, "rate")
        rc, pc = med("relay", size, sessions, "cpu_ms"), med("postfix", size, sessions, "cpu_ms")
        rdc = med("relay+dkim", size, sessions, "cpu_ms")
        pdc = med("postfix+opendkim", size, sessions, "cpu_ms")
        adds = "-" if rdc is None or rc is None else f"{rdc - rc:.2f}"
        print(f"{f'{size // 1024} KB x{sessions}':<13}{ratio(r, p):>15}{ratio(pc, rc):>11}"
              f"{ratio(rd, pd):>13}{ratio(pdc, rdc):>11}{adds:>11}")
    print("\n(CPU ratio: the reference's CPU per message over relay's: above 1 means relay "
          "spends less)")
    print("targets (issue 13, 20 sessions, medians):")

    def check(what: str, value: float | None, ok: bool | None, shown: str) -> None:
        verdict = "-" if value is None else "PASS" if ok else "MISS"
        print(f"  {what:<46}{'-' if value is None else shown:>10}  {verdict}")

    def rate_ratio(a: str, b: str, size: int) -> float | None:
        x, y = med(a, size, 20, "rate"), med(b, size, 20, "rate")
        return None if x is None or y is None else x / y

    def dkim_adds(size: int) -> float | None:
        x, y = med("relay+dkim", size, 20, "cpu_ms"), med("relay", size, 20, "cpu_ms")
        return None if x is None or y is None else x - y

    for what, value, limit, above in (
            ("relay+dkim / postfix+opendkim, 1 KB (>= 2.0x)",
             rate_ratio("relay+dkim", "postfix+opendkim", 1024), 2.0, True),
            ("relay+dkim / postfix+opendkim, 100 KB (>= 1.5x)",
             rate_ratio("relay+dkim", "postfix+opendkim", 100 * 1024), 1.5, True),
            ("relay / postfix, 1 KB (>= 1.5x)", rate_ratio("relay", "postfix", 1024), 1.5, True),
            ("relay / postfix, 100 KB (>= 1.5x)",
             rate_ratio("relay", "postfix", 100 * 1024), 1.5, True),
            ("DKIM adds, ms CPU per 1 KB message (<= 0.4)", dkim_adds(1024), 0.4, False),
            ("DKIM adds, ms CPU per 100 KB message (<= 0.8)", dkim_adds(100 * 1024), 0.8, False),
            ("relay ms CPU per 1 KB message (<= 1.2)", med("relay", 1024, 20, "cpu_ms"), 1.2,
             False)):
        ok = None if value is None else value >= limit if above else value <= limit
        check(what, value, ok, f"{value:.2f}" if value is not None else "-")
    for name in ("relay", "relay+dkim"):
        peak = peaks.get(name)
        check(f"{name} peak memory, MB (< 150)", peak, None if peak is None else peak < 150,
              f"{peak:.0f}" if peak is not None else "-")


if __name__ == "__main__":
    sys.exit(main())
