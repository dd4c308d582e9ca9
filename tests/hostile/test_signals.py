"""Signals a running relay may get, wanted or not: it reloads, drains, exits or carries on.

Each case runs the real ``relay run`` (SMTP in a listener process, mail into an outbox
folder), does its actions (signals to relay or to its listener process, configs written
before a SIGHUP, a client left in the middle of a session) and checks the outcome:
``serving`` (a message sent afterwards is acknowledged and delivered, no traceback in
the log) or an exit with the expected code within the expected time, nothing
acknowledged lost. One table, one runner.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, send


def config(work: Path, port: int, *, allow: str = '"127.0.0.0/8"') -> str:
    return f"""[relay]
hostname = "relay.test"
spool = "{work / 'spool'}"
default_upstream = "box"
shutdown_grace = "20s"
smtp_processes = 1

[metrics]
enabled = false

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "none"
allow = [{allow}]

[[upstream]]
name = "box"
protocol = "outbox"
path = "{work / 'outbox'}"
"""


@dataclass(frozen=True)
class Sig:
    """Send ``sig`` (``times`` times) to relay, or to its listener process (``child``)."""

    sig: signal.Signals
    times: int = 1
    child: bool = False
    group: bool = False                 # the whole process group (relay and its children)


@dataclass(frozen=True)
class Write:
    """Replace the config file (``text(work, port)``; bytes written as they are)."""

    text: Callable[[Path, int], str | bytes]


@dataclass(frozen=True)
class Wait:
    """Wait for a log line matching ``pattern`` (``count`` of them in all)."""

    pattern: str
    count: int = 1


@dataclass(frozen=True)
class Hold:
    """Open an SMTP session up to RCPT and keep it: a client in flight."""


@dataclass(frozen=True)
class Finish:
    """The held session sends its message; it must be acknowledged with 250."""


Action = Sig | Write | Wait | Hold | Finish


@dataclass(frozen=True)
class Case:
    name: str
    actions: tuple[Action, ...]
    expect: str = "serving"             # "serving", or "exit <code>"
    log: tuple[str, ...] = ()           # text the log must contain
    within: float = 30.0                # seconds for an exit
    acknowledged: int = field(default=0)  # messages acknowledged by the actions


OPEN_RELAY = lambda w, p: config(w, p, allow='"0.0.0.0/0"')     # noqa: E731
GARBAGE = lambda w, p: b"\xff\xfe\x00[[[\x01"                    # noqa: E731

CASES = [
    Case("sighup_storm", (Sig(signal.SIGHUP, times=25), Wait(r"reload: config .* applied")),
         log=("reload: config",)),
    Case("sighup_with_an_open_relay_config", (Write(OPEN_RELAY), Sig(signal.SIGHUP),
                                              Wait("reload failed")),
         log=("would be an open relay",)),
    Case("sighup_with_garbage_for_a_config", (Write(GARBAGE), Sig(signal.SIGHUP),
                                              Wait("reload failed")),
         log=("not UTF-8",)),
    Case("sigusr1_is_ignored", (Sig(signal.SIGUSR1), Wait("received SIGUSR1 and ignored")),),
    Case("sigusr2_is_ignored", (Sig(signal.SIGUSR2), Wait("received SIGUSR2 and ignored")),),
    Case("sigpipe_is_ignored", (Sig(signal.SIGPIPE, times=3),)),
    Case("sigwinch_and_sigurg_are_ignored", (Sig(signal.SIGWINCH), Sig(signal.SIGURG))),
    Case("sigusr1_to_the_whole_group", (Sig(signal.SIGUSR1, group=True),
                                        Wait("received SIGUSR1 and ignored")),),
    Case("sighup_to_the_listener_process", (Sig(signal.SIGHUP, child=True),)),
    Case("stopped_and_continued", (Sig(signal.SIGSTOP, group=True),
                                   Sig(signal.SIGCONT, group=True))),
    Case("listener_process_killed_is_respawned", (Sig(signal.SIGKILL, child=True),
                                                  Wait(r"listener process \d+ replaces"))),
    Case("listener_process_terminated_is_respawned", (Sig(signal.SIGTERM, child=True),
                                                      Wait(r"listener process \d+ replaces"))),
    Case("sigterm_lets_the_session_in_flight_finish",
         (Hold(), Sig(signal.SIGTERM), Wait("stopping: no new sessions"), Finish()),
         expect="exit 0", acknowledged=1),
    Case("sigint_drains_like_sigterm", (Sig(signal.SIGINT),), expect="exit 0"),
    Case("second_sigterm_exits_at_once",
         (Hold(), Sig(signal.SIGTERM), Wait("stopping: no new sessions"), Sig(signal.SIGTERM)),
         expect="exit 1", within=10.0, log=("second stop signal",)),
]


def child_pid(relay: Relay) -> int:
    out = relay.cli("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    pids = json.loads(out.stdout)["listener_processes"]
    assert pids, out.stdout
    return int(pids[0])


def outbox(work: Path) -> list[Path]:
    box = work / "outbox"
    return sorted(box.glob("*.eml")) if box.exists() else []


@pytest.mark.fast
def test_the_catalogue_is_plenty() -> None:
    assert len(CASES) >= 12 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_signals(case: Case, tmp_path: Path) -> None:
    port = free_port()
    relay = Relay(tmp_path, config(tmp_path, port)).start(port)
    held: smtplib.SMTP | None = None
    try:
        for action in case.actions:
            if isinstance(action, Sig):
                assert relay.proc is not None
                pid = child_pid(relay) if action.child else relay.proc.pid
                for _ in range(action.times):
                    if action.group:
                        os.killpg(relay.proc.pid, action.sig)
                    else:
                        os.kill(pid, action.sig)
                if action.sig == signal.SIGSTOP:       # stopped: a client waits in the backlog
                    waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
                    waiting.settimeout(0.5)
                    with pytest.raises(TimeoutError):
                        waiting.recv(100)
                    waiting.settimeout(30)
                    held_socket = waiting
                if action.sig == signal.SIGCONT:
                    assert held_socket.recv(100).startswith(b"220 ")
                    held_socket.close()
            elif isinstance(action, Write):
                text = action.text(tmp_path, port)
                if isinstance(text, bytes):
                    relay.config.write_bytes(text)
                else:
                    relay.config.write_text(text)
            elif isinstance(action, Wait):
                relay.wait_log(action.pattern, count=action.count)
            elif isinstance(action, Hold):
                held = smtplib.SMTP("127.0.0.1", port, timeout=30)
                held.ehlo("platform.example")
                held.mail("agent@example.com")
                held.rcpt("customer@example.net")
            elif isinstance(action, Finish):
                assert held is not None
                code, reply = held.data(b"From: agent@example.com\r\nTo: customer@example.net\r\n"
                                            b"Subject: in flight\r\n\r\nok\r\n")
                assert code == 250, reply
                held.close()
                held = None
        if case.expect == "serving":
            wait_until(lambda: relay.proc is not None and relay.proc.poll() is None, timeout=1)
            send(port, subject=f"after {case.name}")
            wait_until(lambda: len(outbox(tmp_path)) == 1, timeout=30)
        else:
            assert relay.proc is not None
            started = time.monotonic()
            code = relay.proc.wait(case.within)
            assert f"exit {code}" == case.expect, relay.log_text()[-3000:]
            assert time.monotonic() - started < case.within
            queue = tmp_path / "spool" / "queue"
            spooled = [p for p in queue.iterdir() if not p.name.endswith(".state")] \
                if queue.exists() else []
            assert len(outbox(tmp_path)) + len(spooled) == case.acknowledged
        text = relay.log_text()
        assert "Traceback" not in text, text[-3000:]
        for fragment in case.log:
            assert fragment in text, text[-3000:]
    finally:
        if held is not None:
            held.close()
        relay.stop()
