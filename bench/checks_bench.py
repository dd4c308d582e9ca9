"""Message structure checks on vs off: relay's throughput and CPU per message, side by side.

Two relays with the production-like config of ``bench/smtp_bench.py`` run together on one
smtp-sink, one with ``structure_checks = "strict"`` (every check: a superset of the
shipped default) and one with ``"off"``; nothing else differs. Each scenario (1 KB and
100 KB, 1 and 20 sessions) alternates between them ``--repeat`` times, so a burst of load
from elsewhere hits both, and the medians are printed with the on/off ratio and the
checks' own CPU per message measured in this process.

    python bench/checks_bench.py               # 7 alternating runs per scenario
    python bench/checks_bench.py --quick       # fewer messages, for a smoke run

Needs root (cgroups, smtp-sink -u) and Debian's postfix package (smtp-source, smtp-sink).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtp_bench import Run, run_scenario
from smtp_peers import Relay, Sink, Sinks

from relay.checks.structure import inspect
from relay.config.schema import STRUCTURE_LEVELS

LEVELS = ("strict", "off")
SCENARIOS = [(1024, 1), (1024, 20), (100 * 1024, 1), (100 * 1024, 20)]


def checked_relay(work: Path, sinks: Sinks, level: str) -> Relay:
    relay = Relay(work, f"checks-{level}", sinks)
    text = relay.config.read_text()
    anchor = 'allow = ["127.0.0.0/8"]\n'
    relay.config.write_text(text.replace(anchor, f'{anchor}structure_checks = "{level}"\n', 1))
    return relay


@contextmanager
def started(relay: Relay) -> Iterator[Relay]:
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def settle(relay: Relay, timeout: float = 120.0) -> None:
    """Wait until ``relay`` removed every delivered message, so its clean-up does not
    compete with (or get counted in) the next run."""
    queue = relay.dir / "spool" / "queue"
    deadline = time.monotonic() + timeout
    while queue.exists() and any(queue.iterdir()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{relay.name}: spool not empty after {timeout}s")
        time.sleep(0.05)


def inline_cost() -> dict[int, float]:
    """The structure checks alone, in this process, on smtp-source-shaped messages."""
    head = (b"Received: from vm ([127.0.0.1])\r\n\tby bench (relay) with ESMTP;\r\n"
            b"\tSun, 06 Dec 2026 07:59:55 +0000\r\nFrom: <bench@example.com>\r\n"
            b"To: <sink@example.net>\r\nDate: Sun, 06 Dec 2026 07:59:55 +0000\r\n"
            b"Message-Id: <577e.0003.0000@vm>\r\n\r\n")
    costs = {}
    for size in (1024, 100 * 1024):
        data = head + (b"X" * 78 + b"\r\n") * (size // 80)
        check = functools.partial(inspect, data, start=head.index(b"From:"),
                                  checks=STRUCTURE_LEVELS["strict"])
        check()
        n = 2000 if size == 1024 else 200
        costs[size] = min(timeit.repeat(check, number=n, repeat=5)) / n
        print(f"  structure checks alone, {size // 1024:4d} KB message: "
              f"{costs[size] * 1e6:7.1f} us", flush=True)
    return costs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer messages (smoke run)")
    ap.add_argument("--repeat", type=int, default=7, metavar="N",
                    help="alternating runs per scenario (median shown; default 7)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/checks_bench.py needs root (cgroups, smtp-sink -u)", file=sys.stderr)
        return 2
    counts = {1024: 300, 100 * 1024: 150} if args.quick else {1024: 2000, 100 * 1024: 1000}
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    alone = inline_cost()
    runs: dict[tuple[str, int, int], list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="relaybench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        sinks = Sinks(Sink(work), Sink(work, dump=work / "checked"))
        relays = [checked_relay(work, sinks, level) for level in LEVELS]
        try:
            with started(relays[0]), started(relays[1]):
                for relay in relays:               # warm up: imports, pools, page cache
                    run_scenario(relay, sinks.bench, size=1024, sessions=20, count=200,
                                 timeout=300)
                    settle(relay)
                for i in range(max(1, args.repeat)):
                    for size, sessions in SCENARIOS:
                        for relay in relays if i % 2 == 0 else relays[::-1]:
                            run = run_scenario(relay, sinks.bench, size=size,
                                               sessions=sessions, count=counts[size],
                                               timeout=300)
                            settle(relay)
                            runs.setdefault((relay.name, size, sessions), []).append(run)
                            print(f"  {relay.name:14} {size // 1024:4d} KB x{sessions:<3d} "
                                  f"{run.rate:7.0f} msg/s  {run.cpu_ms:6.2f} ms CPU/msg",
                                  flush=True)
        finally:
            sinks.bench.stop()
            sinks.check.stop()
    print(f"\n{'scenario':<14}{'off msg/s':>11}{'on msg/s':>10}{'on/off':>8}{'paired':>8}"
          f"{'off ms CPU':>12}{'on ms CPU':>11}{'checks alone':>14}")
    for size, sessions in SCENARIOS:
        on, off = (runs[(f"checks-{level}", size, sessions)] for level in LEVELS)
        r_on = statistics.median(r.rate for r in on)
        r_off = statistics.median(r.rate for r in off)
        paired = statistics.median(a.rate / b.rate for a, b in zip(on, off, strict=True))
        c_on = statistics.median(r.cpu_ms for r in on)
        c_off = statistics.median(r.cpu_ms for r in off)
        print(f"{f'{size // 1024} KB x{sessions}':<14}{r_off:>11.0f}{r_on:>10.0f}"
              f"{r_on / r_off:>8.3f}{paired:>8.3f}{c_off:>12.2f}{c_on:>11.2f}"
              f"{alone[size] * 1000 / c_off:>13.1%}")
    print("\non/off: ratio of the medians; paired: median of each alternating pair's ratio; "
          "checks alone: their own CPU per message as a share of relay's (off)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
