"""The steps of a ``relay check`` walk: records, the transport steps, text and JSON output.

A ``Report`` tells its ``Watcher`` (``relay.probe.live``) of each step as it ends and of
the step it is waiting for, so the command prints the walk as it goes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from relay.errors import RelayError, TransportError
from relay.transports.factory import connect_timed


@dataclass
class Step:
    step: str                      # proxy, socks5, ssh, channel, tcp, tls, greeting, ...
    ok: bool | None                # None: skipped
    seconds: float | None
    detail: str
    hint: str = ""
    reason: str = ""


class Watcher(Protocol):
    """Who hears of a walk as it goes (the live printer)."""

    def step(self, report: Report, step: Step) -> None: ...
    def waiting(self, report: Report, step: str, doing: str) -> None: ...


@dataclass
class Report:
    """Everything ``relay check`` found out about one channel of one upstream."""

    upstream: str
    protocol: str
    target: str                    # host:port
    via: str                       # proxy name or "direct"
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    identity: str = ""             # whose credentials ("its own credentials", an account)
    username: str = ""             # who it logs in as
    watcher: Watcher | None = field(default=None, repr=False, compare=False)
    current: tuple[str, str, float] | None = field(default=None, repr=False, compare=False)

    def _add(self, step: Step) -> None:
        self.steps.append(step)
        self.current = None
        if self.watcher is not None:
            self.watcher.step(self, step)

    def waiting(self, step: str, doing: str = "") -> None:
        """``step`` began: what it does, since when (for a hung step and --timeout)."""
        self.current = (step, doing, time.monotonic())
        if self.watcher is not None:
            self.watcher.waiting(self, step, doing)

    def note_if_slow(self, threshold: float) -> None:
        """Flag a walk slower than the slow-delivery threshold, naming the slowest step."""
        timed = [s for s in self.steps if s.seconds is not None]
        total = sum(s.seconds or 0.0 for s in timed)
        if timed and total > threshold:
            worst = max(timed, key=lambda s: s.seconds or 0.0)
            self.notes.append(
                f"the walk took {total:.1f} s, more than slow_delivery_threshold "
                f"({threshold:g} s); {worst.seconds or 0.0:.1f} s of it in {worst.step}")

    @property
    def ok(self) -> bool:
        return all(s.ok is not False for s in self.steps)

    @property
    def reason(self) -> str:
        return next((s.reason or s.step for s in self.steps if s.ok is False), "")

    def passed(self, step: str, seconds: float | None, detail: str) -> None:
        self._add(Step(step, True, seconds, detail))

    def skipped(self, step: str, detail: str) -> None:
        self._add(Step(step, None, None, detail))

    def failed(self, step: str, seconds: float | None, error: RelayError | str, *,
               reason: str = "", hint: str = "") -> None:
        if isinstance(error, RelayError):
            hint = hint or error.hint
            reason = reason or getattr(error, "reason", "") or getattr(error, "error", "")
        self._add(Step(step, False, seconds, str(error), hint, reason))

    def timed_out(self, limit: float) -> None:
        """The walk's --timeout ran out during this channel's current step."""
        step, doing, since = self.current or ("walk", "", time.monotonic())
        waited = time.monotonic() - since
        what = f" ({doing})" if doing else ""
        self.failed(step, waited, f"no answer within the --timeout of {limit:g} s: still "
                    f"waiting for {step}{what} after {waited:.1f} s", reason="timeout",
                    hint="the step above is where the path hangs; raise --timeout if it is "
                         "only slow")


_SOCKS_OUTER = {"proxy_unreachable"}
_SSH_INNER = {"ssh_channel_refused"}


async def transport_steps(report: Report, transport: Any, kind: str, host: str, port: int,
                          *, timeout: float) -> socket.socket | None:
    """Connect through ``transport`` (kind: direct, socks5, ssh), one step per phase."""
    first = {"socks5": "proxy", "ssh": "ssh"}.get(kind, "tcp")
    report.waiting(first, f"connecting to {host}:{port}" + (
        f" through {report.via}" if kind != "direct" else ""))
    started = time.monotonic()
    try:
        sock, timings = await connect_timed(transport, host, port, timeout=timeout)
    except TransportError as exc:
        elapsed = time.monotonic() - started
        if kind == "socks5":
            step = "proxy" if exc.reason in _SOCKS_OUTER else "socks5"
        elif kind == "ssh":
            step = "channel" if exc.reason in _SSH_INNER else "ssh"
        else:
            step = "tcp"
        report.failed(step, elapsed, exc)
        return None
    name = report.via
    if "proxy_connect" in timings:
        report.passed("proxy", timings["proxy_connect"], f"SOCKS5 proxy {name} reached")
        report.passed("socks5", timings["proxy_handshake"],
                      f"proxy {name} authenticated us and connected to {host}:{port}")
    elif "ssh_connect" in timings:
        reused = timings["ssh_connect"] < 0.001
        report.passed("ssh", timings["ssh_connect"],
                      f"SSH bastion {name}: " + ("connection reused" if reused else
                                                 "host key verified, key accepted"))
        report.passed("channel", timings["ssh_channel"], f"channel to {host}:{port} open")
    else:
        report.passed("tcp", time.monotonic() - started, f"connected to {host}:{port}")
    return sock


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(2):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass


# ---- output ---------------------------------------------------------------------------------

def header(r: Report) -> str:
    via = f" via {r.via}" if r.via != "direct" else ""
    who = f", as {r.username}" if r.username else ""
    whose = f" ({r.identity})" if r.identity else ""
    return f"{r.upstream} ({r.protocol} {r.target}{via}){who}{whose}"


def step_lines(s: Step) -> list[str]:
    verdict = {True: "ok", False: "FAIL", None: "--"}[s.ok]
    ms = f"{s.seconds * 1000:.0f} ms" if s.seconds is not None else ""
    lines = [f"  {verdict:<5} {s.step:<10} {ms:>8}  {s.detail}"]
    if s.hint and s.ok is False:
        lines.append(f"  {'':<5} {'':<10} {'':>8}  hint: {s.hint}")
    return lines


def footer(r: Report) -> list[str]:
    return [*(f"  note: {n}" for n in r.notes),
            f"  => {'ok' if r.ok else 'FAILED (' + r.reason + ')'}", ""]


def format_text(reports: list[Report]) -> str:
    lines: list[str] = []
    for r in reports:
        lines.append(header(r))
        for s in r.steps:
            lines += step_lines(s)
        lines += footer(r)
    return "\n".join(lines)


def to_json(reports: list[Report]) -> dict[str, Any]:
    return {"ok": all(r.ok for r in reports),
            "upstreams": [{"name": r.upstream, "protocol": r.protocol, "target": r.target,
                           "via": r.via, "identity": r.identity, "username": r.username,
                           "ok": r.ok, "reason": r.reason, "notes": r.notes,
                           "steps": [asdict(s) for s in r.steps]} for r in reports]}
