"""A DNS server that stops answering during SPF: 451 4.4.3, the loop never blocked, mail flows.

Inbound sessions whose SPF lookups hang must not block the event loop, nor take the
worker threads that store other listeners' mail (fsync) while they wait for DNS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from relay.checks import spf as spf_module
from relay.checks.spf import SpfChecker
from relay.config.schema import HostPort, ListenerConfig
from relay.dns import Resolver, lookup_pool
from relay.maillog import MailLog
from relay.routing import Router
from relay.smtp.accept import RoutedChecks
from relay.smtp.listener import SmtpListener
from relay.spool.store import Spool
from tests.smtp.conftest import RawClient

SESSIONS = 8
DNS_TIMEOUT = 2.0


@contextlib.contextmanager
def dead_dns() -> Iterator[tuple[HostPort, list[int]]]:
    """A DNS server that receives queries and never answers; counts what it got."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)
    got = [0]
    done = threading.Event()

    def swallow() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                sock.recvfrom(4096)
                got[0] += 1

    thread = threading.Thread(target=swallow, daemon=True)
    thread.start()
    try:
        yield HostPort("127.0.0.1", int(sock.getsockname()[1])), got
    finally:
        done.set()
        thread.join(5)
        sock.close()


class LoopLag:
    """How late the loop runs a 10 ms timer: the proof that nothing blocks it."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.01)
            self.worst = max(self.worst, loop.time() - start - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def listener(name: str, **kw: object) -> ListenerConfig:
    return ListenerConfig(name=name, protocol="smtp", listen=HostPort("127.0.0.1", 0),
                          tls="none", auth="none", **kw)  # type: ignore[arg-type]


async def test_dns_outage_during_spf_blocks_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.recover()
    started: list[SmtpListener] = []
    with dead_dns() as (dns, queries):
        pool = lookup_pool()                  # as relay's processes wire it
        resolver = Resolver(servers=[dns], timeout=DNS_TIMEOUT, executor=pool)
        spf = SpfChecker(resolver=resolver, hostname="relay.test")
        router = Router((), "up")
        inbound = SmtpListener(
            listener("inbound", relay_domains=("example.net",), spf="reject"),
            hostname="relay.test", accept=spool.store, maillog=MailLog(),
            checks=RoutedChecks(router=router, profile=None, upstream_profiles={}, spf=spf,
                                spf_policy="reject", space=spool.health))
        platform = SmtpListener(
            listener("platform", allow=(ipaddress.ip_network("127.0.0.0/8"),)),
            hostname="relay.test", accept=spool.store, maillog=MailLog(),
            checks=RoutedChecks(router=router, profile=None, upstream_profiles={}, spf=None,
                                spf_policy="off", space=spool.health))
        for lst in (inbound, platform):
            await lst.start()
            started.append(lst)
        in_port, pl_port = inbound.addresses[0][1], platform.addresses[0][1]

        def spf_session() -> str:
            c = RawClient(in_port, timeout=60)
            c.reply()
            c.cmd("EHLO mta.example.org")
            reply = c.cmd("MAIL FROM:<someone@sender.example.org>")
            c.close()
            return reply

        def platform_message() -> tuple[str, float]:
            c = RawClient(pl_port, timeout=60)
            c.reply()
            c.cmd("EHLO platform.test")
            started = time.monotonic()
            c.cmd("MAIL FROM:<agent@example.com>")
            c.cmd("RCPT TO:<customer@example.net>")
            c.cmd("DATA")
            reply = c.cmd("Subject: while DNS is down\r\n\r\nhello\r\n.")
            c.close()
            return reply, time.monotonic() - started

        # The clients run on threads of their own: the relay's worker threads are the
        # ones under test, and they live in this process too.
        loop = asyncio.get_running_loop()
        clients = ThreadPoolExecutor(SESSIONS + 1, thread_name_prefix="test-client")
        try:
            with LoopLag() as lag:
                waiting = [loop.run_in_executor(clients, spf_session) for _ in range(SESSIONS)]
                deadline = time.monotonic() + 20
                while queries[0] < SESSIONS and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)       # until every session waits on DNS
                reply, took = await loop.run_in_executor(clients, platform_message)
                refusals = await asyncio.gather(*waiting)
        finally:
            clients.shutdown(wait=False)
            for lst in started:
                await lst.stop_accepting()
                await lst.wait_closed(1.0)
            spool.close()
            pool.shutdown(wait=False, cancel_futures=True)
    assert queries[0] >= SESSIONS
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    assert took < DNS_TIMEOUT / 2, f"a platform message waited {took:.2f} s behind DNS"
    assert all(r.startswith("451 4.4.3 ") for r in refusals), refusals
    assert lag.worst < 0.25, f"the event loop was blocked for {lag.worst:.3f} s"


@pytest.mark.fast
async def test_an_evaluation_past_its_budget_is_temperror(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """Queued behind busy DNS threads past the overall budget: temperror, not a wait."""
    monkeypatch.setattr(spf_module, "OVERALL_TIMEOUT", 0.2)
    pool = ThreadPoolExecutor(1)
    release = threading.Event()
    pool.submit(release.wait, 30)                 # the only DNS thread is busy
    try:
        checker = SpfChecker(resolver=Resolver(timeout=0.1, executor=pool),
                             hostname="relay.test")
        started = time.monotonic()
        mf, hr = await checker.check(ip="192.0.2.1", sender="a@sender.example.org",
                                     helo="mta.example.org")
        assert time.monotonic() - started < 5
        assert mf is not None and mf.result == "temperror" and mf.domain == "sender.example.org"
        assert hr is not None and hr.result == "temperror" and hr.identity == "helo"
        verdict = await checker.verdict("reject", ip="192.0.2.1",
                                        sender="a@sender.example.org", helo="mta.example.org")
        assert verdict.refusal is not None and verdict.refusal.reply.startswith("451 4.4.3 ")
    finally:
        release.set()
        pool.shutdown(wait=True)
