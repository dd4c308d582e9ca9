"""The fault catalogue: one row per injected fault, run by ``tests/faults/test_catalogue.py``.

A row names the fault, what surrounds relay (``Setup``), and what the fault does to a
running relay (``inject``: submit mail, break something, maybe restart). The runner then
heals everything, waits until relay has delivered what it acknowledged, and checks the
books (``Rig.account``). To add a fault, add a row; most need only proxy rules
(``proxied``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.faults.proxy import Rule
from tests.faults.rig import Rig, Setup
from tests.peers import wait_until
from tests.peers.tmpfs import fill

DEFERRED = r": deferred to="


@dataclass(frozen=True)
class Fault:
    name: str
    inject: Callable[[Rig], None]
    setup: Setup = field(default_factory=Setup)
    may_duplicate: bool = False          # the upstream's outcome was unknown (counted)


# --- building blocks of the scripts ----------------------------------------------------------

def proxied(*rules: Rule, n: int = 3, log: str = DEFERRED) -> Callable[[Rig], None]:
    """Arm ``rules`` at the middlebox, submit ``n`` messages, see every rule fire."""
    def inject(r: Rig) -> None:
        r.proxy.arm(*rules)
        subs = r.submit(n)
        assert all(s.code == 250 for s in subs), subs     # upstream faults never reach them
        wait_until(lambda: r.proxy.armed == 0, timeout=30)
        if log:
            r.wait_log(log)
    return inject


def refused_connections(r: Rig) -> None:
    r.proxy.refuse(True)
    r.submit(3)
    r.wait_log(DEFERRED + r".*(Connection refused|connect)", count=3)


def reused_session_dies(r: Rig) -> None:
    r.submit(1)
    wait_until(lambda: len(r.delivered()) == 1)
    r.proxy.arm(Rule("MAIL", "drop"))             # the pooled session is dead at reuse
    r.submit(2)
    wait_until(lambda: r.proxy.armed == 0)


def no_plaintext(r: Rig) -> None:
    assert "MAIL" not in r.proxy.plaintext, r.proxy.plaintext


def starttls_stripped(r: Rig) -> None:
    r.proxy.arm(Rule("EHLO", "strip_starttls", times=6))
    r.submit(2)
    r.wait_log(r"does not offer STARTTLS", count=2)
    no_plaintext(r)
    assert r.delivered() == {}
    r.heals.append(lambda: no_plaintext(r))


def tls_untrusted_then_fixed(r: Rig) -> None:
    good = r.relay.config.read_text()
    wrong = r.work / "other-ca.pem"
    import trustme
    wrong.write_bytes(trustme.CA().cert_pem.bytes())
    r.relay.config.write_text(good.replace(str(r.work / "ca.pem"), str(wrong)))
    r.relay.signal(signal.SIGHUP)
    r.wait_log(r"reload: config")
    r.submit(2)
    r.wait_log(DEFERRED + r".*certificate", count=2)
    no_plaintext(r)
    assert r.delivered() == {}

    def fix() -> None:
        r.relay.config.write_text(good)
        r.relay.signal(signal.SIGHUP)
        r.wait_log(r"reload: config", count=2)
    r.heals.append(fix)


def spool_below_reserve(r: Rig) -> None:
    filler = r.fs / "filler"
    fill(filler, leave=1024 * 1024)               # 1 MB free; the reserve is 2 MB
    wait_until(lambda: r.readyz()[0] == 503, timeout=10)
    _, text = r.readyz()
    assert "spool_reserve" in text, text
    assert r.metric("relay_spool_writable") == 0
    for s in r.submit(2):
        assert s.reply.startswith("452 4.3.1") and s.stage == "MAIL", s   # before any data
    filler.unlink()
    wait_until(lambda: r.readyz()[0] == 200, timeout=10)
    assert all(s.code == 250 for s in r.submit(2))


def spool_read_only(r: Rig) -> None:
    r.spool_read_only()
    try:
        wait_until(lambda: r.readyz()[0] == 503, timeout=10)
        assert "read-only" in r.readyz()[1]
        for s in r.submit(2):
            assert s.reply.startswith("451 4.3.0") and s.stage == "MAIL", s
    finally:
        r.spool_read_only(False)
    wait_until(lambda: r.readyz()[0] == 200, timeout=10)
    assert all(s.code == 250 for s in r.submit(1))


def spool_read_only_while_recording(r: Rig) -> None:
    r.proxy.arm(Rule("dot", "delay", "1.0"))     # the upstream is slow to take the message
    assert r.submit(1)[0].code == 250
    wait_until(lambda: r.proxy.armed == 0, timeout=10)
    r.spool_read_only()                          # ... and the spool goes read-only meanwhile
    r.heals.append(lambda: r.spool_read_only(False))
    r.wait_log(r"delivered to everyone, but the spool cannot record it")
    wait_until(lambda: r.metric("relay_delivery_unrecorded_outcomes") == 1, timeout=10)
    r.wait_log(r"spool not writable")
    assert r.readyz()[0] == 503
    assert sum(r.delivered().values()) == 1       # not sent again while it waits


def spool_fills_mid_burst(r: Rig) -> None:
    r.proxy.arm(Rule("MAIL", "stall", times=20))  # nothing leaves while the burst comes in
    subs = r.submit(8, size=300_000)              # bounded: 1 MB holds about three
    refused = [s for s in subs if s.code != 250]
    assert refused and len(refused) < len(subs), subs
    assert all(s.reply.startswith("452 4.3.1") for s in refused), refused


def kill9_waiting_for_data_reply(r: Rig) -> None:
    r.proxy.arm(Rule("DATA", "stall", times=2))   # the message body was never sent
    assert all(s.code == 250 for s in r.submit(2))
    wait_until(lambda: r.proxy.armed == 0)
    r.kill9()
    r.proxy.disarm()
    r.restart()


def kill9_mid_stream(r: Rig) -> None:
    """kill -9 while mail streams in and out, at a moment one message is sure to be in
    the window a crash can duplicate (others may be too): the upstream has taken it and
    answered, relay has not read the reply yet (the proxy holds it), so the next start
    sends it again, and must have counted it (relay's handover journal)."""
    import threading
    done = threading.Event()

    def stream() -> None:
        while not done.is_set() and len(r.submissions) < 40:
            r.submit(1)

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: sum(s.code == 250 for s in r.submissions) >= 5, timeout=30)
    r.proxy.arm(Rule("dot", "stall_after"))
    wait_until(lambda: r.proxy.stalls == 1, timeout=30)    # well within data_timeout (2s)
    r.kill9()
    done.set()
    t.join(60)
    r.restart()


def sigterm_with_stalled_delivery(r: Rig) -> None:
    r.proxy.arm(Rule("MAIL", "stall", times=2))
    assert all(s.code == 250 for s in r.submit(2))
    wait_until(lambda: r.proxy.armed == 0)
    assert r.relay.stop() == 0                   # within shutdown_grace, exit 0
    r.proxy.disarm()
    r.restart()


def reloads_while_upstream_flaps(r: Rig) -> None:
    r.proxy.arm(Rule("connect", "drop", times=4))
    for i in range(3):
        r.submit(1)
        r.relay.signal(signal.SIGHUP)
        r.wait_log(r"reload: config", count=i + 1)
    wait_until(lambda: r.proxy.armed == 0)


def faketime_file(r: Rig) -> Path:
    assert r.clock is not None
    return r.clock


def clock_forward(r: Rig) -> None:
    r.proxy.arm(Rule("RCPT", "reply", "451 4.3.0 busy", times=50))
    r.submit(3)
    r.wait_log(DEFERRED, count=3)
    faketime_file(r).write_text("+2d\n")          # NTP steps two days ahead
    r.submit(1)                                   # wakes the scheduler
    r.wait_log(DEFERRED, count=4)
    wait_until(lambda: not any(m["in_flight"] for m in r.queue()))
    attempts = sorted(m["attempts"] for m in r.queue())
    assert attempts == [1, 1, 1, 1], attempts     # no burst of the three older ones
    out = r.relay.cli("queue", "retry", "--all")  # the provider still says 451
    assert out.returncode == 0, out.stderr
    r.wait_log(DEFERRED, count=8)
    assert "bounced" not in r.relay.log_text()    # two wall-clock days are not a lifetime

    def retry_now() -> None:
        r.proxy.disarm()
        assert r.relay.cli("queue", "retry", "--all").returncode == 0
    r.heals.append(retry_now)


def clock_back(r: Rig) -> None:
    r.proxy.arm(Rule("RCPT", "reply", "451 4.3.0 busy", times=3))
    r.submit(3)
    r.wait_log(DEFERRED, count=3)
    faketime_file(r).write_text("-2d\n")          # the clock is set back two days
    wait_until(lambda: sum(r.delivered().values()) == 3, timeout=20)   # retried all the same


def dns_dead_during_spf(r: Rig) -> None:
    for s in r.submit(2, port=r.inbound, sender="someone@sender.example.org"):
        assert s.reply.startswith("451 4.4.3") and s.stage == "MAIL", s
    assert all(s.code == 250 for s in r.submit(2))       # the platform's mail flows


def bastion_drops_and_refuses(r: Rig) -> None:
    assert r.bastion is not None
    r.proxy.arm(Rule("DATA", "stall"))            # a session is open through the bastion
    assert r.submit(1)[0].code == 250
    wait_until(lambda: r.proxy.armed == 0)
    r.bastion.stop()                              # it drops, and refuses reconnects
    r.proxy.disarm()
    r.wait_log(DEFERRED + r".*SSH bastion", count=2, timeout=30)
    assert all(s.code == 250 for s in r.submit(2))
    r.heals.append(r.bastion.start)


def token_endpoint_down(r: Rig) -> None:
    r.token_proxy.refuse(True)
    r.submit(2)
    r.wait_log(DEFERRED + r".*token", count=2)
    r.heals.append(lambda: r.token_proxy.refuse(False))


def token_endpoint_slow(r: Rig) -> None:
    assert r.tokens is not None
    r.tokens.delay = 3.0                          # past request_timeout = 1s
    r.submit(3)
    r.wait_log(DEFERRED + r".*token", count=2)

    def fast() -> None:
        assert r.tokens is not None
        r.tokens.delay = 0.0
    r.heals.append(fast)


# --- the table -----------------------------------------------------------------------------

RECORDING_TLS = Setup(upstream="recording", tls="starttls")
OAUTH = Setup(upstream="recording", oauth=True)
BUSY = "451 4.3.0 try again later"

FAULTS: list[Fault] = [
    # the upstream's network path
    Fault("upstream refuses connections, then listens", refused_connections),
    Fault("connection closed at connect", proxied(Rule("connect", "drop", times=2))),
    Fault("connection reset at connect", proxied(Rule("connect", "rst", times=2))),
    Fault("no greeting until the timeout", proxied(Rule("greeting", "stall"))),
    Fault("greeting 421", proxied(Rule("greeting", "reply", "421 4.3.2 not now"))),
    Fault("greeting is not SMTP", proxied(Rule("greeting", "garbage"))),
    Fault("connection closed after EHLO", proxied(Rule("EHLO", "drop"))),
    Fault("EHLO answered 421", proxied(Rule("EHLO", "reply", "421 4.3.2 closing"))),
    Fault("MAIL answered 451", proxied(Rule("MAIL", "reply", BUSY))),
    Fault("MAIL never answered", proxied(Rule("MAIL", "stall"))),
    Fault("RCPT answered 450", proxied(Rule("RCPT", "reply", "450 4.2.1 mailbox busy"))),
    Fault("RCPT answered with garbage", proxied(Rule("RCPT", "garbage"))),
    Fault("connection lost after RCPT", proxied(Rule("RCPT", "drop_after"))),
    Fault("DATA answered 451", proxied(Rule("DATA", "reply", BUSY))),
    Fault("DATA answered 421", proxied(Rule("DATA", "reply", "421 4.3.2 closing"))),
    Fault("connection reset at DATA", proxied(Rule("DATA", "rst"))),
    Fault("connection lost mid-message", proxied(Rule("body", "drop"))),
    Fault("end of data answered 451", proxied(Rule("dot", "reply", BUSY))),
    Fault("connection lost after the data, before the reply",
          proxied(Rule("dot", "drop_after")), may_duplicate=True),
    Fault("reply to the data never comes", proxied(Rule("dot", "stall_after")),
          may_duplicate=True),
    Fault("a pooled session died while idle", reused_session_dies),
    Fault("SIGHUP reloads while the upstream flaps", reloads_while_upstream_flaps),
    # TLS to the upstream: never a plaintext fallback
    Fault("STARTTLS stripped by a middlebox", starttls_stripped, RECORDING_TLS),
    Fault("STARTTLS refused 454", proxied(Rule("STARTTLS", "reply", "454 4.7.0 TLS not "
                                                "available"), log=DEFERRED + r".*454 4\.7\.0"),
          RECORDING_TLS),
    Fault("connection lost during the TLS handshake", proxied(Rule("STARTTLS", "drop_after")),
          RECORDING_TLS),
    Fault("upstream certificate not trusted, then fixed by reload",
          tls_untrusted_then_fixed, RECORDING_TLS),
    # storage
    Fault("spool below its reserve at MAIL", spool_below_reserve,
          Setup(spool_fs="4m", spool_reserve="2m", smtp_processes=1)),
    Fault("spool read-only at MAIL", spool_read_only, Setup(spool_fs="2m", smtp_processes=1)),
    Fault("spool read-only when the outcome is recorded", spool_read_only_while_recording,
          Setup(spool_fs="2m")),
    Fault("spool fills up in the middle of a burst", spool_fills_mid_burst,
          Setup(spool_fs="1m")),
    # the process
    Fault("kill -9 while waiting for the DATA reply", kill9_waiting_for_data_reply),
    Fault("kill -9 in the middle of a stream of submissions", kill9_mid_stream,
          Setup(smtp_processes=1), may_duplicate=True),
    Fault("SIGTERM while deliveries stall", sigterm_with_stalled_delivery),
    # time, DNS, the tunnel, the token endpoint
    Fault("wall clock steps forward two days", clock_forward,
          Setup(retry="30s", lifetime="1d", faketime=True)),
    Fault("wall clock steps back two days", clock_back, Setup(retry="1s", faketime=True)),
    Fault("DNS stops answering during SPF", dns_dead_during_spf, Setup(spf_dns_dead=True)),
    Fault("SSH bastion drops mid-session and refuses reconnects", bastion_drops_and_refuses,
          Setup(ssh=True)),
    Fault("token endpoint down", token_endpoint_down, OAUTH),
    Fault("token endpoint slower than request_timeout", token_endpoint_slow, OAUTH),
]
