"""``relay check`` as it goes: each step printed when it ends, a hung step named while it
hangs ("... tls  still waiting after 5 s: TLS handshake"), at 5, 10, 20, 40 s..."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from relay.probe.steps import Report, Step, footer, header, step_lines

FIRST_NOTICE = 5.0


class LivePrinter:
    """Writes a walk line by line (text output); the ``Watcher`` of every report."""

    def __init__(self, write: Callable[[str], None], *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._clock = clock
        self._report: Report | None = None
        self._next_notice = FIRST_NOTICE

    def begin(self, report: Report) -> None:
        report.watcher = self
        self._report = report
        self._write(header(report))

    def step(self, report: Report, step: Step) -> None:
        for line in step_lines(step):
            self._write(line)

    def waiting(self, report: Report, step: str, doing: str) -> None:
        self._next_notice = FIRST_NOTICE

    def end(self, report: Report) -> None:
        for line in footer(report):
            self._write(line)
        self._report = None

    def tick(self) -> None:
        """Say which step is still waiting, once it has waited 5 s, 10 s, 20 s..."""
        report = self._report
        if report is None or report.current is None:
            return
        step, doing, since = report.current
        waited = self._clock() - since
        if waited >= self._next_notice:
            self._write(f"  ...   {step:<10} {'':>8}  still waiting after {waited:.0f} s"
                        + (f": {doing}" if doing else ""))
            self._next_notice *= 2

    async def ticking(self, period: float = 0.5) -> None:
        """Run ``tick`` until cancelled."""
        while True:
            await asyncio.sleep(period)
            self.tick()
