"""A contact-center day at a compressed clock: relay's pacing against the theoretical minimum.

Twenty mailboxes send through relay to a provider that enforces Exchange Online's quota
itself (30 messages per minute per mailbox, answering
``554 5.2.0 ... SubmissionQuotaExceededException`` past it: tests/fakes/quota_provider.py,
on loopback). Three of them burst 2,000-message campaigns (at minutes 0, 10 and 20 of the
day); the other seventeen send a message now and then (a password reset, a case update)
all along. The day runs once through one relay and once through three relays sharing the
quotas through a private redis-server (each message submitted to one of the three in
turn), and prints, side by side:

- drain time: from the first campaign message relay accepted to the last campaign message
  the provider accepted, against the theoretical minimum the quota allows for these
  arrivals (each mailbox's message i leaves at max(arrival_i, leave_{i-30} + window), the
  arrivals being when relay answered 250); target within 5 %;
- quota violations the provider saw: its throttling replies, and the most messages it
  accepted from one mailbox in any window (target: 0 replies, at most 30);
- the longest wait of a quiet mailbox's message while campaigns burst (submitted to
  accepted; target: under one window).

It draws each mailbox's delivery rate over time into a PNG (matplotlib, the ``bench``
extra: ``pip install matplotlib``).

The clock is compressed: a minute of the day lasts 60/speedup seconds (default speedup 30:
a 2 s window, the day's 90 minutes in about 3 minutes). The only setting the bench changes
from relay's shipped defaults is the quota's window, given as ``[[upstream.quota]]
messages = 30, window = "2s"`` instead of the exchange-online profile's 30 per 60 s (whose
window is fixed), with the provider enforcing the same compressed window; fsync,
retries, connections (4 per upstream) and everything else are the defaults. The listener
allows loopback without AUTH and the upstream is plain SMTP on loopback.

    python bench/pacing_bench.py                  # the day, one relay then three
    python bench/pacing_bench.py --quick          # 300-message campaigns, a smoke run
    python bench/pacing_bench.py --png day.png --speedup 30

Needs Debian's redis-server for the three-replica run (scripts/test-debs.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.fakes.quota_provider import provider_thread  # noqa: E402

QUOTA = 30                     # Exchange Online: messages per minute per mailbox
MAILBOXES = 20
CAMPAIGNS = 3                  # mailboxes that burst
CAMPAIGN_AT = (0.0, 10.0, 20.0)   # minutes of the day


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"relay exited:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"relay did not listen on {port}")


@dataclass
class Day:
    """What the platform submits: (minute of the day, mailbox, subject), in time order."""

    sends: list[tuple[float, str, str]] = field(default_factory=list)


def plan_day(campaign_size: int, rng: random.Random) -> Day:
    day = Day()
    end = CAMPAIGN_AT[-1] + campaign_size / QUOTA          # when the last campaign drains
    for c, at in enumerate(CAMPAIGN_AT[:CAMPAIGNS]):
        box = f"campaign{c}@example.com"
        day.sends += [(at, box, f"c{c}-{i}") for i in range(campaign_size)]
    for q in range(MAILBOXES - CAMPAIGNS):
        box = f"agent{q}@example.com"
        t, i = rng.uniform(0, 3), 0
        while t < end:
            day.sends.append((t, box, f"q{q}-{i}"))
            t += rng.uniform(1.0, 5.0)                        # every few minutes
            i += 1
    day.sends.sort(key=lambda s: s[0])
    return day


def relay_config(work: Path, listen: int, provider: int, window: float, *, redis: str = "",
                 replicas: int = 1) -> Path:
    pacing = (f'\n[pacing]\nbackend = "redis"\nredis_url = "{redis}"\nreplicas = {replicas}\n'
              if redis else "")
    text = f"""[relay]
hostname = "relay.bench"
spool = "{work / 'spool'}"
default_upstream = "exchange"

[metrics]
enabled = false

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{listen}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "exchange"
protocol = "smtp"
host = "127.0.0.1"
port = {provider}
tls = "none"

[[upstream.quota]]
window = "{window:g}s"
messages = {QUOTA}
{pacing}"""
    path = work / "relay.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def relay(work: Path, config: Path, listen: int) -> Iterator[None]:
    log = work / "relay.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "run", "-c", str(config)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_port(listen, proc, log)
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[str]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


def submit(day: Day, ports: list[int], minute: float) -> dict[str, float]:
    """Play the day: each message submitted at its time (one session per relay per
    mailbox kind); returns subject -> monotonic time its 250 came back."""
    start = time.monotonic()
    done: dict[str, float] = {}
    lock = threading.Lock()
    streams: dict[tuple[str, int], list[tuple[float, str, str]]] = {}
    for n, (at, box, subject) in enumerate(day.sends):
        port = ports[n % len(ports)]
        kind = "campaign" if box.startswith("campaign") else "quiet"
        streams.setdefault((kind if kind == "quiet" else box, port), []).append(
            (at, box, subject))

    def play(items: list[tuple[float, str, str]], port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as s:
            for at, box, subject in items:
                delay = start + at * minute - time.monotonic()
                if delay > 0:
                    time.sleep(delay)           # the platform's own pace
                msg = (f"From: {box}\r\nTo: customer@example.net\r\nSubject: {subject}\r\n"
                       f"Message-ID: <{subject}@bench>\r\n\r\nhello\r\n")
                s.sendmail(box, ["customer@example.net"], msg.encode())
                with lock:
                    done[subject] = time.monotonic()

    threads = [threading.Thread(target=play, args=(items, port))
               for (_, port), items in streams.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def theoretical(times: list[float], window: float) -> float:
    """The earliest the last of these arrivals (one mailbox's) could leave under the
    quota: leave_i = max(arrival_i, leave_{i-QUOTA} + window)."""
    leave: list[float] = []
    for i, a in enumerate(sorted(times)):
        leave.append(a if i < QUOTA else max(a, leave[i - QUOTA] + window))
    return leave[-1] if leave else 0.0


@dataclass
class Result:
    name: str
    messages: int
    drain: float
    minimum: float
    throttles: int
    peak: int
    quiet_wait: float
    rates: dict[str, list[float]]


def run(name: str, day: Day, *, replicas: int, window: float, work: Path) -> Result:
    minute = window                      # one simulated minute is one quota window
    with contextlib.ExitStack() as stack, \
            provider_thread(limit=QUOTA, window=window) as provider:
        redis = stack.enter_context(redis_server(work)) if replicas > 1 else ""
        ports = []
        for r in range(replicas):
            rw = work / f"relay{r}"
            rw.mkdir()
            listen = free_port()
            cfg = relay_config(rw, listen, provider.port, window, redis=redis,
                               replicas=replicas)
            stack.enter_context(relay(rw, cfg, listen))
            ports.append(listen)
        begin = time.monotonic()
        submitted = submit(day, ports, minute)
        deadline = time.monotonic() + 3600
        while provider.total < len(day.sends) and time.monotonic() < deadline:
            time.sleep(0.2)
        accepted = {s: t for box in provider.accepted
                    for s, t in zip(provider.subjects[box], provider.accepted[box],
                                    strict=True)}
        # the campaigns are what the quota binds: from the first campaign message handed to
        # relay to the last one the provider accepted, against the quota's minimum
        arrivals: dict[str, list[float]] = {}
        for _at, box, subject in day.sends:
            if box.startswith("campaign"):
                arrivals.setdefault(box, []).append(submitted[subject] - begin)
        first = min(min(times) for times in arrivals.values())
        drain = max(accepted[s] for _, b, s in day.sends if b.startswith("campaign")) \
            - begin - first
        minimum = max(theoretical(times, window) for times in arrivals.values()) - first
        quiet = [accepted[s] - submitted[s] for _, b, s in day.sends
                 if not b.startswith("campaign") and s in accepted]
        rates: dict[str, list[float]] = {}
        for box, times in provider.accepted.items():
            bins = [0.0] * (int((max(accepted.values()) - begin) / window) + 2)
            for t in times:
                bins[int((t - begin) / window)] += 1
            rates[box] = bins
        return Result(name, len(day.sends), drain, minimum, len(provider.throttled),
                      provider.peak(), max(quiet, default=0.0), rates)


def draw(results: list[Result], path: Path, window: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 4 * len(results)), sharex=True)
    for ax, res in zip(axes if len(results) > 1 else [axes], results, strict=True):
        quiet: list[float] = []
        for box, bins in sorted(res.rates.items()):
            minutes = list(range(len(bins)))
            if box.startswith("campaign"):
                ax.plot(minutes, bins, linewidth=1.6, label=box.split("@")[0])
            else:
                ax.plot(minutes, bins, linewidth=0.5, color="grey", alpha=0.5)
                quiet = [a + b for a, b in zip(quiet + [0.0] * (len(bins) - len(quiet)),
                                               bins + [0.0] * (len(quiet) - len(bins)),
                                               strict=True)]
        ax.plot(list(range(len(quiet))), quiet, linewidth=1, color="black", linestyle=":",
                label=f"{MAILBOXES - CAMPAIGNS} quiet mailboxes together")
        ax.axhline(QUOTA, color="red", linestyle="--", linewidth=1,
                   label=f"quota: {QUOTA} per mailbox per minute")
        ax.set_title(f"{res.name}: delivery rate per mailbox (thin grey: each quiet mailbox)")
        ax.set_ylabel("messages per minute")
        ax.set_ylim(0, QUOTA * 1.5)
        ax.legend(loc="upper center", ncol=5, fontsize=8)
    (axes[-1] if len(results) > 1 else axes).set_xlabel(
        f"minute of the day (compressed: one minute = {window:g} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="300-message campaigns")
    ap.add_argument("--campaign", type=int, default=2000, help="messages per campaign")
    ap.add_argument("--speedup", type=float, default=30.0,
                    help="how much faster than real time (a window is 60/speedup s)")
    ap.add_argument("--png", default="pacing_day.png", help="where to draw the rates")
    ap.add_argument("--replicas", default="1,3", help="the runs, e.g. 1,3")
    args = ap.parse_args()
    size = 300 if args.quick else args.campaign
    window = 60.0 / args.speedup
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f} at start" + ("  (busy: figures are pessimistic)"
                                       if load[0] > 1.5 else ""))
    day = plan_day(size, random.Random(7))
    quiet = sum(1 for s in day.sends if not s[1].startswith("campaign"))
    print(f"day: {MAILBOXES} mailboxes, {CAMPAIGNS} campaigns of {size} at minutes "
          f"{', '.join(f'{m:g}' for m in CAMPAIGN_AT)}, {quiet} quiet messages; quota "
          f"{QUOTA}/min per mailbox; one minute = {window:g} s")
    results = []
    for n in (int(x) for x in args.replicas.split(",")):
        with tempfile.TemporaryDirectory(prefix="relay-pacing-bench-") as tmp:
            name = f"{n} replica{'s' if n > 1 else ''}" + (" + Redis" if n > 1 else "")
            results.append(run(name, day, replicas=n, window=window, work=Path(tmp)))
    print()
    print(f"{'run':<20} {'messages':>8} {'drain s':>8} {'minimum s':>9} {'ratio':>6} "
          f"{'throttles':>9} {'peak/window':>11} {'quiet wait max':>15}")
    for r in results:
        print(f"{r.name:<20} {r.messages:>8} {r.drain:>8.1f} {r.minimum:>9.1f} "
              f"{r.drain / r.minimum:>6.3f} {r.throttles:>9} {f'{r.peak}/{QUOTA}':>11} "
              f"{f'{r.quiet_wait:.3f} s ({r.quiet_wait / window:.2f} w)':>15}")
    print(f"targets: ratio <= 1.05, 0 throttles, peak <= {QUOTA}, quiet wait < 1 window "
          f"({window:g} s)")
    draw(results, Path(args.png), window)
    print(f"delivery rate per mailbox: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
