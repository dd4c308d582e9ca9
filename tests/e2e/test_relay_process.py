"""The real relay binary end to end: clients -> relay -> smtp-sink, crashes and refusals."""

from __future__ import annotations

import contextlib
import json
import shutil
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import free_port, wait_until
from tests.peers.relayproc import (
    Relay,
    Sink,
    config,
    running_relay,
    sample,
    scrape,
    send,
    subjects,
)

# a header the structure checks accept (the listener's default level, "standard")
HEAD = b"From: a@example.com\r\nTo: b@example.net\r\n"


def queued(spool: Path) -> list[Path]:
    """Queued messages (their state files aside)."""
    q = spool / "queue"
    return [p for p in q.iterdir() if p.is_file() and not p.name.endswith(".state")
            ] if q.exists() else []


def test_swaks_through_relay_to_smtp_sink(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    try:
        with running_relay(tmp_path, config(spool=tmp_path / "spool", listen=port,
                                            sink=sink.port), port) as relay:
            out = subprocess.run(
                [shutil.which("swaks") or "swaks", "--server", f"127.0.0.1:{port}",
                 "--from", "agent@example.com", "--to", "customer@example.net",
                 "--header", "X-Zendesk-Email-Id: 01ABC", "--body", "ticket update"],
                capture_output=True, text=True, timeout=60, check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            assert "250 2.0.0 Ok: queued as" in out.stdout
            wait_until(lambda: len(sink.messages()) == 1)
            relay.wait_log(r"delivered to=<customer@example.net> upstream=sink")
            wait_until(lambda: not queued(tmp_path / "spool"))
        body = sink.messages()[0]            # smtp-sink dumps with LF line ends
        assert b"\nX-Zendesk-Email-Id: 01ABC\n" in body
        assert b"by relay.test (relay)" in body
    finally:
        sink.stop()


def test_kill9_mid_delivery_then_delivered_once_after_restart(tmp_path: Path) -> None:
    """The 250 means on disk: kill -9 while delivery hangs, restart, delivered exactly once."""
    blackhole = socket.create_server(("127.0.0.1", 0))   # accepts, never greets
    sink_port = blackhole.getsockname()[1]
    port = free_port()
    spool = tmp_path / "spool"
    cfg = config(spool=spool, listen=port, sink=sink_port)
    relay = Relay(tmp_path, cfg).start(port)
    try:
        ids = [send(port, subject=f"n{i}") for i in range(5)]
        relay.wait_log(r"received", count=5)
    finally:
        relay.kill9()
        blackhole.close()
    assert len(queued(spool)) == 5
    sink = Sink(tmp_path, port=sink_port).start()
    try:
        relay.start(port)
        wait_until(lambda: len(sink.messages()) == 5, timeout=60)
        wait_until(lambda: not queued(spool), timeout=30)
        assert relay.stop() == 0
        assert subjects(sink) == [f"n{i}".encode() for i in range(5)]
        for qid in ids:
            assert relay.log_text().count(f"{qid}: delivered") == 1
    finally:
        relay.stop()
        sink.stop()


def test_deferred_mail_survives_kill9_and_queue_retry_sends_it(tmp_path: Path) -> None:
    sink = Sink(tmp_path)               # not started: the provider is down
    port = free_port()
    spool = tmp_path / "spool"
    cfg = config(spool=spool, listen=port, sink=sink.port, retry_first="1h", retry_max="1h")
    relay = Relay(tmp_path, cfg).start(port)
    try:
        first = send(port, subject="d0")
        relay.wait_log(f"{first}: deferred")
        for i in (1, 2):             # inside the fail-fast window: they wait, unattempted
            send(port, subject=f"d{i}")
        wait_until(lambda: relay.cli("queue", "list", "--json").stdout.count(
            '"reason": "suspended"') == 2)
        assert len(list((spool / "queue").glob("*.state"))) == 1
    except BaseException:
        relay.stop()                 # a failure here leaves no relay running
        raise
    relay.kill9()
    sink.start()
    relay = Relay(tmp_path, cfg).start(port)
    try:
        wait_until(lambda: len(sink.messages()) == 2, timeout=30)   # the two never tried
        listing = relay.cli("queue", "list", "--json")
        assert listing.returncode == 0, listing.stderr
        queue = json.loads(listing.stdout)
        assert queue["counts"] == {"active": 0, "deferred": 1, "held": 0, "waiting": 0}, \
            queue["counts"]
        assert [(m["id"], m["state"], m["attempts"]) for m in queue["messages"]] == \
            [(first, "deferred", 1)]
        assert len(sink.messages()) == 2         # the deferred one waits for its retry time
        out = relay.cli("queue", "retry", "--all")
        assert out.returncode == 0, out.stdout + out.stderr
        wait_until(lambda: len(sink.messages()) == 3, timeout=30)
        wait_until(lambda: not queued(spool), timeout=30)
    finally:
        relay.stop()
        sink.stop()


def test_upstream_down_then_up(tmp_path: Path) -> None:
    sink = Sink(tmp_path)
    port = free_port()
    with running_relay(tmp_path, config(spool=tmp_path / "spool", listen=port,
                                        sink=sink.port), port) as relay:
        send(port)
        relay.wait_log(r"deferred .*connect")
        sink.start()
        try:
            wait_until(lambda: len(sink.messages()) == 1, timeout=30)
        finally:
            sink.stop()


def test_open_relay_attempt_is_refused_and_nothing_queued(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = config(spool=spool, listen=port, sink=sink.port).replace(
        'allow = ["127.0.0.0/8"]', 'allow = ["10.20.0.0/16"]')
    try:
        with running_relay(tmp_path, cfg, port) as relay, \
                smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("outsider.example")
            code, reply = s.mail("spammer@example.org")
            if code == 250:                  # refused at MAIL or at RCPT: either is fine
                code, reply = s.rcpt("victim@example.net")
            assert (code, reply[:5]) == (550, b"5.7.1")
            relay.wait_log(r"rejected .*relay_denied")
        assert not queued(spool)
        assert sink.messages() == []
    finally:
        sink.stop()


@contextlib.contextmanager
def raw_session(port: int) -> Iterator[socket.socket]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.recv(1024)
        yield s


def _reply(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"])
def test_smuggling_never_reaches_the_provider(tmp_path: Path, fake_end: bytes) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    spool = tmp_path / "spool"
    try:
        with running_relay(tmp_path, config(spool=spool, listen=port, sink=sink.port), port), \
                raw_session(port) as s:
            for cmd in (b"EHLO x.example", b"MAIL FROM:<a@example.com>",
                        b"RCPT TO:<b@example.net>", b"DATA"):
                s.sendall(cmd + b"\r\n")
                assert _reply(s)[:1] in b"23", cmd
            smuggled = (b"Subject: first\r\n\r\nbody" + fake_end +
                        b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@example.net>\r\n"
                        b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
            s.sendall(smuggled)
            reply = _reply(s)
            assert reply.startswith(b"550 5.5.2"), reply
            s.sendall(b"QUIT\r\n")
            assert _reply(s).startswith(b"221")
        assert not queued(spool)
        assert sink.messages() == []
    finally:
        sink.stop()


def test_disk_full_answers_452_and_keeps_nothing(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(spool)],
                   check=True)
    sink = Sink(tmp_path)                 # never started: its dump directory is removed
    try:
        port = free_port()
        # No reserve: the message is refused because it does not fit, after its DATA
        # (tests/faults covers the reserve refusing MAIL before any data).
        cfg = config(spool=spool, listen=port, sink=sink.port).replace(
            "smtp_processes = ", 'spool_reserve = "0"\nsmtp_processes = ')
        with running_relay(tmp_path, cfg, port) as relay, \
                smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("x.example")
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            code, reply = s.data(HEAD + b"Subject: big\r\n\r\n" + (b"x" * 74 + b"\r\n") * 10_000)
            assert (code, reply[:5]) == (452, b"4.3.1"), reply
            relay.wait_log(r"spool_full")
            assert not queued(spool)
            assert not list((spool / "tmp").iterdir())
            # the session goes on, and a small message still fits
            s.rset()
            s.mail("a@example.com")
            s.rcpt("b@example.net")
            assert s.data(HEAD + b"Subject: small\r\n\r\nhi\r\n")[0] == 250
    finally:
        sink.stop()
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_provider_slow_to_answer_data_is_counted_and_explained(tmp_path: Path) -> None:
    """The Cisco document's complaint: a send over 10 s, and which hop caused it."""
    sink = Sink(tmp_path, "-W", ".:11").start()      # 11 s before the reply to end of data
    port, mport = free_port(), free_port()
    try:
        with running_relay(tmp_path, config(spool=tmp_path / "spool", listen=port,
                                            sink=sink.port, metrics=mport), port) as relay:
            send(port)
            relay.wait_log(r"delivery to sink took 1\d\.\d s; 1\d\.\d s waiting for the "
                           r"provider's reply to DATA", timeout=60)
            metrics = scrape(mport)
        assert sample(metrics, "relay_slow_deliveries_total", upstream="sink",
                      stage="data") == 1
        assert sample(metrics, "relay_delivery_stage_seconds_bucket", upstream="sink",
                      stage="data", le="10.0") == 0
        assert sample(metrics, "relay_delivery_stage_seconds_bucket", upstream="sink",
                      stage="data", le="20.0") == 1
    finally:
        sink.stop()
