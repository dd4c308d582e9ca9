"""The real relay binary (``python -m relay run``) and a dumping smtp-sink, for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.peers import free_port, need, refuse_in_fast_lane, wait_for_port, wait_until

ROOT = Path(__file__).resolve().parents[2]


class Sink:
    """Postfix's smtp-sink dumping every message it accepts into ``dump`` (one file each).

    Extra ``flags`` inject faults (``-r DATA`` answers DATA with 4xx, ``-f RCPT`` 5xx...).
    """

    def __init__(self, work: Path, *flags: str, port: int | None = None) -> None:
        self.port = port or free_port()
        # smtp-sink writes as `nobody`, who cannot enter pytest's 0700 temporary tree.
        self.dump = Path(tempfile.mkdtemp(prefix=f"relay-sink-{self.port}-"))
        os.chmod(self.dump, 0o777)
        self.log = work / f"sink-{self.port}.log"
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sink:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [need("smtp-sink"), "-u", "nobody", *self.flags, "-d", f"{self.dump}/%M.",
                 f"127.0.0.1:{self.port}", "128"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port("127.0.0.1", self.port, proc=self.proc, log=self.log)
        return self

    def stop(self, *, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        if not keep:
            shutil.rmtree(self.dump, ignore_errors=True)

    def messages(self) -> list[bytes]:
        return [p.read_bytes() for p in sorted(self.dump.iterdir()) if p.is_file()]


def subjects(sink: Sink) -> list[bytes]:
    """The Subject of every message the sink holds, sorted (dumps are LF-terminated)."""
    return sorted(m.split(b"Subject: ")[1].split(b"\n")[0] for m in sink.messages())


def refuses_connections(port: int) -> bool:
    """True when nothing accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return True
    return False


class Relay:
    """One relay process on a config written into ``work``."""

    def __init__(self, work: Path, config: str) -> None:
        self.work = work
        self.config = work / "relay.toml"
        self.config.write_text(config)
        self.log = work / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *ports: int, env: dict[str, str] | None = None) -> Relay:
        refuse_in_fast_lane("relay (python -m relay run)")
        # A restarted relay appends to the same log: wait for *its* start line.
        started_before = self.log_text().count("relay started")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", "-c", str(self.config)], cwd=ROOT,
                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True)
        for port in ports:
            wait_for_port("127.0.0.1", port, proc=self.proc, log=self.log, timeout=60)
        self.wait_log("relay started", timeout=60, count=started_before + 1)
        return self

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, pattern: str, *, timeout: float = 30.0, count: int = 1) -> None:
        rx = re.compile(pattern)

        def seen() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"relay exited {self.proc.returncode}:\n{self.log_text()}")
            return len(rx.findall(self.log_text())) >= count
        try:
            wait_until(seen, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"no {pattern!r} in relay's log:\n{self.log_text()}") from None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, *, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        refuse_in_fast_lane(f"relay (python -m relay {' '.join(args)})")
        return subprocess.run([sys.executable, "-m", "relay", *args, "-c", str(self.config)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              check=False)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series == name and not want:
            return float(value)
        if series.startswith(name + "{"):
            got = ",".join(sorted(series[len(name) + 1:-1].split(",")))
            if got == want:
                return float(value)
    return 0.0


def send(port: int, *, sender: str = "agent@example.com", to: str = "customer@example.net",
         subject: str = "hello", body: str = "hi", extra: str = "") -> str:
    """Submit one message over SMTP; returns the queue id from the 250 reply."""
    msg = (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n{extra}"
           f"Message-ID: <{time.time_ns()}@test>\r\n\r\n{body}\r\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo("test.example")
        s.mail(sender)
        code, reply = s.rcpt(to)
        assert code == 250, reply
        code, reply = s.data(msg.encode())
        assert code == 250, reply
    text = reply.decode()
    return text.rsplit(" ", 1)[-1]


@contextlib.contextmanager
def running_relay(work: Path, config: str, *ports: int) -> Iterator[Relay]:
    relay = Relay(work, config).start(*ports)
    try:
        yield relay
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.stop()


# [relay] smtp_processes of config() when a test gives none; tests/e2e/conftest.py runs
# every end-to-end test with SMTP in the main process (0) and in two listener processes (2).
SMTP_PROCESSES = {"default": 1}


def config(*, spool: Path, listen: int, sink: int, metrics: int | None = None,
           extra: str = "", retry_first: str = "1s", retry_max: str = "2s",
           listener_extra: str = "", smtp_processes: int | None = None) -> str:
    """A config: one allow-listed loopback SMTP listener, one smtp-sink upstream."""
    procs = SMTP_PROCESSES["default"] if smtp_processes is None else smtp_processes
    metrics_block = (f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n' if metrics
                     else "[metrics]\nenabled = false\n")
    return f"""[relay]
hostname = "relay.test"
spool = "{spool}"
default_upstream = "sink"
shutdown_grace = "20s"
smtp_processes = {procs}

[relay.retry]
first = "{retry_first}"
max = "{retry_max}"
jitter = 0.0

{metrics_block}
[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{listen}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
{listener_extra}
[[upstream]]
name = "sink"
protocol = "smtp"
host = "127.0.0.1"
port = {sink}
tls = "none"
connect_timeout = "5s"
{extra}"""
