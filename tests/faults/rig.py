"""The fault rig: the real relay process between a platform and a real upstream, and the books.

``Rig`` starts the upstream (Postfix's smtp-sink, or the recording aiosmtpd upstream for
TLS and XOAUTH2), a ``FaultProxy`` in front of it, any other peer a case asks for (an
SSH bastion, a token endpoint, a small tmpfs spool, a silent DNS server), and relay
itself (``python -m relay run``) with short timeouts and retries. A case then submits
mail and injects its fault; ``settle`` heals everything and waits until the queue is
empty; ``account`` checks the promise: every acknowledged message delivered, nothing
delivered that was not acknowledged, and a second copy only where relay counted an
unknown outcome (``relay_delivery_outcome_unknown_total``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.faults.proxy import FaultProxy
from tests.faults.upstreams import MAILBOX, AnyIssued, ThreadedUpstream, subject_of
from tests.peers import free_port, need, wait_until
from tests.peers.relayproc import Relay, Sink, sample, scrape
from tests.peers.sshd import Sshd, sshd
from tests.peers.tmpfs import read_only, tmpfs
from tests.peers.token_server import TokenServer, token_server

SPOOL_DIRS = ("queue", "tmp", "corrupt")


@dataclass
class Setup:
    """What a case needs around relay (the defaults: smtp-sink, direct, plain TCP)."""

    upstream: str = "sink"             # "sink" (smtp-sink) | "recording" (aiosmtpd)
    tls: str = "none"                  # the upstream's: "none" | "starttls"
    oauth: bool = False                # XOAUTH2 with a token endpoint behind a fault proxy
    ssh: bool = False                  # through an SSH bastion (a private sshd)
    spool_fs: str | None = None        # the spool on a tmpfs of this size ("2m")
    spool_reserve: str = "0"
    spf_dns_dead: bool = False         # an inbound SPF listener whose DNS never answers
    smtp_processes: int = 0
    retry: str = "0.3s"
    lifetime: str = "5d"
    timeouts: str = "2s"
    faketime: bool = False             # relay's wall clock from a file (libfaketime)
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Submission:
    subject: str
    code: int                          # 250: acknowledged; 0: no reply (connection lost)
    reply: str
    stage: str = ""                    # the command relay answered last: MAIL, RCPT, DATA


def faketime_library() -> str:
    """libfaketime (Debian package faketime), or a clear failure naming the package."""
    need("faketime")
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    if not found:
        raise RuntimeError("libfaketime.so.1 is not installed: run scripts/test, which "
                           "installs the Debian packages listed in scripts/test-debs.txt")
    return str(found[0])


class Rig:
    """One relay process and its peers for one case; use as a context manager."""

    def __init__(self, work: Path, name: str, setup: Setup) -> None:
        self.work, self.name, self.setup = work, name, setup
        self.submissions: list[Submission] = []
        self.unknown = 0.0                 # unknown outcomes counted by earlier processes
        self.heals: list[Callable[[], None]] = []
        self._stack = contextlib.ExitStack()
        self.port, self.mport, self.inbound = free_port(), free_port(), free_port()
        self.spool = work / "spool"
        self.fs = work / "fs"                   # the small filesystem of spool_fs
        self.ca = trustme.CA()
        self.clock: Path | None = None
        if setup.faketime:
            # Wall time from a file the case rewrites ("+2d"); the monotonic clock is left
            # alone, as a real clock step leaves it.
            self.clock = work / "faketime"
            self.clock.write_text("+0\n")
            self.setup = setup = dataclasses.replace(setup, env={
                **setup.env, "LD_PRELOAD": faketime_library(), "FAKETIME_NO_CACHE": "1",
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_TIMESTAMP_FILE": str(self.clock)})

    # --- set-up -------------------------------------------------------------------------

    def __enter__(self) -> Rig:
        try:
            self._start()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _start(self) -> None:
        s, stack = self.setup, self._stack
        self.tokens: TokenServer | None = None
        if s.oauth:
            self.tokens = stack.enter_context(token_server(self.ca))
            self.token_proxy = stack.enter_context(FaultProxy(self.tokens.port, tcp=True))
            (self.work / "ca.pem").write_bytes(self.ca.cert_pem.bytes())
        if s.upstream == "sink":
            sink = Sink(self.work).start()
            stack.callback(sink.stop)
            self.sink: Sink | ThreadedUpstream = sink
        else:
            kw: dict[str, Any] = {}
            if s.tls == "starttls":
                ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self.ca.issue_cert("upstream.test").configure_cert(ctx)
                kw["starttls"] = ctx
                (self.work / "ca.pem").write_bytes(self.ca.cert_pem.bytes())
            if s.oauth:
                assert self.tokens is not None
                kw["tokens"] = AnyIssued(self.tokens)
            rec = ThreadedUpstream(**kw).start()
            stack.callback(rec.stop)
            self.sink = rec
        self.proxy = stack.enter_context(FaultProxy(self.sink.port))
        self.bastion: Sshd | None = None
        if s.ssh:
            self.bastion = stack.enter_context(sshd(self.work / "sshd"))
        if s.spool_fs:
            # queue/, tmp/ and corrupt/ on a small tmpfs of their own (symbolic links from
            # spool/), so it can be remounted read-only while relay keeps its lock file
            # open for writing in spool/ (an open writer would make the remount "busy").
            stack.enter_context(tmpfs(self.fs, s.spool_fs))
            self.spool.mkdir()
            for d in SPOOL_DIRS:
                (self.fs / d).mkdir()
                (self.spool / d).symlink_to(self.fs / d)
        self.dns = None
        if s.spf_dns_dead:
            import socket
            dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dead.bind(("127.0.0.1", 0))
            stack.callback(dead.close)
            self.dns = int(dead.getsockname()[1])
        self.relay = Relay(self.work, self.config())
        stack.callback(self._stop_relay)
        self.relay.start(self.port, env=s.env)

    def config(self) -> str:
        s = self.setup
        proxies = upstream_auth = token_source = inbound = dns = ""
        if s.ssh:
            assert self.bastion is not None
            proxies = f"""
[[proxy]]
name = "bastion"
url = "ssh://{self.bastion.user}@127.0.0.1:{self.bastion.port}"
key_file = "{self.bastion.client_key}"
known_hosts = "{self.bastion.known_hosts}"
connect_timeout = "{s.timeouts}"
"""
        if s.oauth:
            assert self.tokens is not None
            upstream_auth = f'auth = "xoauth2"\nusername = "{MAILBOX}"\ntoken_source = "tokens"\n'
            token_source = f"""
[[token_source]]
name = "tokens"
kind = "client_credentials"
provider = "custom"
token_url = "https://127.0.0.1:{self.token_proxy.port}/tenant-id/oauth2/v2.0/token"
client_id = "{self.tokens.client_id}"
client_secret_file = "{self._secret()}"
ca_file = "{self.work / 'ca.pem'}"
request_timeout = "1s"
"""
        tls = ""
        if s.tls == "starttls":
            tls = (f'ca_file = "{self.work / "ca.pem"}"\ntls_server_name = "upstream.test"\n')
        if s.spf_dns_dead:
            dns = f'dns_servers = ["127.0.0.1:{self.dns}"]\ndns_timeout = "1s"\n'
            inbound = f"""
[[listener]]
name = "inbound"
protocol = "smtp"
listen = "127.0.0.1:{self.inbound}"
tls = "none"
auth = "none"
relay_domains = ["example.net"]
spf = "reject"
"""
        return f"""[relay]
hostname = "relay.test"
spool = "{self.spool}"
default_upstream = "up"
shutdown_grace = "2s"
smtp_processes = {s.smtp_processes}
spool_reserve = "{s.spool_reserve}"
# The catalogue is about loss, not pacing: provider pauses shrink with the retry times,
# so a throttling reply (a 421 from the fault proxy) still pauses, briefly.
throttle_replies = []
{dns}
[relay.retry]
first = "{s.retry}"
max = "{s.retry}"
jitter = 0.0
lifetime = "{s.lifetime}"

[[throttle_reply]]
name = "any-421"
code = 421
action = "pause-upstream"
pause = "{s.retry}"
max_pause = "{s.retry}"

[metrics]
listen = "127.0.0.1:{self.mport}"

[[listener]]
name = "platform"
protocol = "smtp"
listen = "127.0.0.1:{self.port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
{inbound}
[[upstream]]
name = "up"
protocol = "smtp"
host = "127.0.0.1"
port = {self.proxy.port}
tls = "{s.tls}"
connect_timeout = "{s.timeouts}"
command_timeout = "{s.timeouts}"
data_timeout = "{s.timeouts}"
{tls}{upstream_auth}{'via = "bastion"' if s.ssh else ''}
{proxies}{token_source}"""

    def _secret(self) -> Path:
        assert self.tokens is not None
        path = self.work / "client_secret"
        path.write_text(self.tokens.client_secret + "\n")
        path.chmod(0o600)
        return path

    # --- what a case does ----------------------------------------------------------------

    def submit(self, n: int = 3, *, port: int | None = None, sender: str = "agent@example.com",
               recipient: str = "customer@example.net", size: int = 0) -> list[Submission]:
        """Send ``n`` messages (bodies of about ``size`` bytes), one session each; record
        what relay answered."""
        out = []
        body = "hello\r\n" + ("x" * 76 + "\r\n") * (size // 78)
        for _ in range(n):
            subject = f"{self.name}-{len(self.submissions)}"
            msg = (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
                   f"Message-ID: <{subject}@test>\r\n\r\n{body}").encode()
            stage = "CONNECT"
            try:
                with smtplib.SMTP("127.0.0.1", port or self.port, timeout=30) as c:
                    c.ehlo("platform.test")
                    stage = "MAIL"
                    code, reply = c.mail(sender)
                    if code == 250:
                        stage = "RCPT"
                        code, reply = c.rcpt(recipient)
                    if code == 250:
                        stage = "DATA"
                        code, reply = c.data(msg)
            except (smtplib.SMTPException, OSError) as exc:
                code, reply = 0, str(exc).encode()
            sub = Submission(subject, code, f"{code} {reply.decode(errors='replace')}", stage)
            self.submissions.append(sub)
            out.append(sub)
        return out

    def queue(self) -> list[dict[str, Any]]:
        """``relay queue list --json`` of the running relay."""
        out = self.relay.cli("queue", "list", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        messages: list[dict[str, Any]] = json.loads(out.stdout)["messages"]
        return messages

    def readyz(self) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.mport}/readyz",
                                        timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def spool_read_only(self, on: bool = True) -> None:
        read_only(self.fs, on)

    def metric(self, name: str, **labels: str) -> float:
        return sample(scrape(self.mport), name, **labels)

    def wait_log(self, pattern: str, *, count: int = 1, timeout: float = 30.0) -> None:
        self.relay.wait_log(pattern, count=count, timeout=timeout)

    def kill9(self) -> None:
        self.unknown += self._unknown_now()
        self.relay.kill9()

    def restart(self) -> None:
        self.relay.start(self.port, env=self.setup.env)

    def _unknown_now(self) -> float:
        try:
            return self.metric("relay_delivery_outcome_unknown_total", upstream="up")
        except OSError:
            return 0.0

    def _stop_relay(self) -> None:
        self.relay.stop()

    # --- the books ------------------------------------------------------------------------

    def queued(self) -> list[Path]:
        q = self.spool / "queue"
        return [p for p in q.iterdir() if not p.name.endswith(".state")] if q.exists() else []

    def delivered(self) -> collections.Counter[str]:
        if isinstance(self.sink, Sink):      # a dump being written reads as "?" for now
            # smtp-sink also dumps a transaction the proxy cut before DATA (envelope
            # lines only); its Received line is written only once DATA began.
            return collections.Counter(subject_of(m) for m in self.sink.messages()
                                       if b"by smtp-sink (smtp-sink)" in m)
        return collections.Counter(self.sink.subjects())

    def settle(self, timeout: float = 30.0) -> None:
        """Heal every fault, then wait until relay has delivered all it acknowledged."""
        self.proxy.disarm()
        self.proxy.refuse(False)
        for heal in reversed(self.heals):
            heal()
        self.heals.clear()
        acked = {s.subject for s in self.submissions if s.code == 250}
        deadline = time.monotonic() + timeout
        try:
            wait_until(lambda: acked <= set(self.delivered()) and not self.queued(),
                       timeout=max(1.0, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(
                f"{self.name}: not settled: acknowledged {sorted(acked)}, delivered "
                f"{dict(self.delivered())}, queued {[p.name for p in self.queued()]}\n"
                f"{self.relay.log_text()[-6000:]}") from None

    def account(self, *, may_duplicate: bool) -> None:
        """The promise, checked: nothing acknowledged lost, nothing else delivered."""
        acked = {s.subject for s in self.submissions if s.code == 250}
        delivered = self.delivered()
        log = self.relay.log_text()
        assert acked <= set(delivered), f"lost: {sorted(acked - set(delivered))}"
        assert set(delivered) <= acked, (
            f"delivered but never acknowledged: {sorted(set(delivered) - acked)}")
        extra = sum(n - 1 for n in delivered.values())
        unknown = self.unknown + self._unknown_now()
        assert extra <= unknown, (f"{extra} duplicate(s) but only {unknown:g} unknown "
                                  f"outcome(s) counted: {dict(delivered)}")
        assert may_duplicate or extra == 0, f"unexpected duplicates: {dict(delivered)}"
        assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
        assert self.relay.stop() == 0, log[-3000:]


@contextlib.contextmanager
def rig(work: Path, name: str, setup: Setup) -> Iterator[Rig]:
    with Rig(work, name, setup) as r:
        yield r
