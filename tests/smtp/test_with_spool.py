"""The listener with the real spool behind it: 250 means on disk; refused means nothing is."""

from __future__ import annotations

import ipaddress
import smtplib
from pathlib import Path

import pytest

from relay.config.schema import (
    Config,
    HeaderRule,
    HostPort,
    ListenerConfig,
    MetricsConfig,
    RelaySection,
)
from relay.headers import HeaderGuard
from relay.routing import Router
from relay.smtp.accept import AcceptPipeline, RoutedChecks
from relay.spool.store import Spool
from tests.peers.tmpfs import fill, tmpfs
from tests.smtp.conftest import RawClient, StartRelay, run, submit

ALLOW = (ipaddress.ip_network("127.0.0.0/8"),)
MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: spooled\r\n\r\nbody\r\n"


async def test_250_only_once_the_message_is_in_the_spool(start_relay: StartRelay,
                                                         tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    stored: list[str] = []
    spool.add_listener(lambda msg: stored.append(msg.queue_id))
    relay = await start_relay(allow=ALLOW, accept=spool.store)

    def go() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.ehlo("platform.test")
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            return s.data(MSG)

    code, reply = await run(go)
    assert code == 250 and reply.startswith(b"2.0.0 Ok: queued as ")
    queue_id = reply.decode().rsplit(" ", 1)[1]
    assert stored == [queue_id] and spool.queue_ids() == [queue_id]
    data = await spool.read_message(queue_id)
    assert data.startswith(b"Received: from platform.test ([127.0.0.1])") and data.endswith(MSG)
    msg = spool.load(queue_id)
    assert msg.envelope.sender == "a@example.com"
    assert msg.envelope.recipients == ("b@example.net",)
    assert msg.envelope.listener == "platform" and msg.envelope.trusted


async def test_smuggling_leaves_the_spool_empty(start_relay: StartRelay, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    relay = await start_relay(allow=ALLOW, accept=spool.store)

    def go() -> str:
        c = RawClient(relay.port)
        c.reply()
        c.cmd("EHLO x")
        c.cmd("MAIL FROM:<a@example.com>")
        c.cmd("RCPT TO:<b@example.net>")
        c.cmd("DATA")
        c.send(b"Subject: x\r\n\r\na\n.\r\nMAIL FROM:<e@evil.example>\r\n.\r\n")
        r = c.reply()
        c.close()
        return r

    assert (await run(go)).startswith("550 5.5.2 ")
    assert spool.queue_ids() == []
    root = tmp_path / "spool"
    assert not root.exists() or [p for p in root.rglob("*") if p.is_file()] == []


async def test_mail_is_refused_452_before_data_while_the_spool_is_below_its_reserve(
        start_relay: StartRelay, tmp_path: Path) -> None:
    """Postfix's queue_minfree: the client hears 452 4.3.1 at MAIL, before sending DATA."""
    with tmpfs(tmp_path / "fs", "2m") as fs:
        spool = Spool(fs / "spool", reserve=512 * 1024)
        spool.recover()
        checks = RoutedChecks(router=Router((), "up"), profile=None, upstream_profiles={},
                              spf=None, spf_policy="off", space=spool.health)
        relay = await start_relay(allow=ALLOW, accept=spool.store, checks=checks)
        filler = fs / "filler"
        fill(filler, leave=800 * 1024)           # 0.78 MB free: 0.5 MB reserve + 0.28 MB

        def session() -> list[str]:
            c = RawClient(relay.port)
            c.reply()
            c.cmd("EHLO platform.test")
            got = [c.cmd("MAIL FROM:<a@example.com> SIZE=400000"),    # would dip in reserve
                   c.cmd("MAIL FROM:<a@example.com> SIZE=1000")]
            c.cmd("QUIT")
            c.close()
            return got

        too_big, fits = await run(session)
        assert too_big.startswith("452 4.3.1 "), too_big
        assert fits.startswith("250 "), fits
        filler.unlink()
        fill(filler, leave=300 * 1024)           # below the reserve: nothing is taken
        await spool.health.refresh()             # measured now (the cache lasts 1 s)

        def mail() -> str:
            c = RawClient(relay.port)
            c.reply()
            c.cmd("EHLO platform.test")
            reply = c.cmd("MAIL FROM:<a@example.com>")
            c.close()
            return reply

        assert (await run(mail)).startswith("452 4.3.1 Insufficient system storage")
        assert relay.refused("spool_full") == 2
        assert spool.queue_ids() == []
        filler.unlink()
        spool.close()


async def test_a_leading_continuation_line_is_refused_even_without_checks(
        start_relay: StartRelay, tmp_path: Path) -> None:
    """relay's Received: field on top would swallow it (and a protected field with it)."""
    spool = Spool(tmp_path / "spool")
    relay = await start_relay(allow=ALLOW, accept=spool.store, checks=None)

    def go(msg: bytes) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as s:
            s.ehlo("platform.test")
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            return s.data(msg)

    code, reply = await run(go, b"\tX-Mailer: CXone\r\n" + MSG)
    assert (code, reply) == (550, b"5.6.0 line 1 is a continuation line; the header must "
                                  b"start with a field")
    assert spool.queue_ids() == []
    code, _ = await run(go, b"X-Mailer: CXone\r\n\tfolded\r\n" + MSG)   # folding is fine
    assert code == 250 and len(spool.queue_ids()) == 1


async def test_the_accept_pipeline_vouches_only_for_what_the_data_reader_let_in(
        start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline tells the spool its messages are CRLF-only (``crlf_checked``), so the
    spool does not scan them: a bare CR or LF must be refused before it (550), and what
    it stores, its own header fields included, must be CRLF-only."""

    def scanned(data: bytes) -> None:
        raise AssertionError("the spool scanned a message the pipeline vouched for")

    monkeypatch.setattr("relay.spool.store.bare_line_ending", scanned)
    spool = Spool(tmp_path / "spool")
    rules = (HeaderRule("add", "X-Relay", "yes"), HeaderRule("replace", "Subject", "new"))
    lc = ListenerConfig(name="platform", protocol="smtp", listen=HostPort("127.0.0.1", 0),
                        header_rules=rules)
    config = Config(source=tmp_path / "relay.toml", relay=RelaySection(hostname="relay.test"),
                    metrics=MetricsConfig(), listeners=(lc,), upstreams=())
    accept = AcceptPipeline(listener=lc, config=config, spool=spool,
                            router=Router((), "up"), signer=None, guard=HeaderGuard())
    relay = await start_relay(allow=ALLOW, accept=accept)

    for bare in (b"Subject: hi\rBcc: x@evil.example\r\n\r\nbody\r\n",
                 b"Subject: hi\r\n\r\nfirst\n.\nMAIL FROM:<e@evil.example>\r\n"):
        assert (await run(submit, relay.port, bare)).startswith("550 5.5.2 "), bare
    assert spool.queue_ids() == [] and relay.refused("smuggling") == 2
    assert (await run(submit, relay.port, MSG)).startswith("250 ")
    [qid] = spool.queue_ids()
    stored = await spool.read_message(qid)
    assert stored.count(b"\r") == stored.count(b"\n") == stored.count(b"\r\n")
    assert b"\r\nX-Relay: yes\r\n" in stored and b"\r\nSubject: new\r\n" in stored
    spool.close()
