"""SIGHUP reload, SIGTERM drain and a real Prometheus scrape, against the real relay process."""

from __future__ import annotations

import re
import signal
import smtplib
import threading
from pathlib import Path

from tests.peers import free_port, wait_until
from tests.peers.prometheus import check_metrics, prometheus_server
from tests.peers.relayproc import (
    Relay,
    Sink,
    config,
    refuses_connections,
    sample,
    scrape,
    send,
    subjects,
)

# a header the structure checks accept (the listener's default level, "standard")
HEAD = b"From: agent@example.com\r\nTo: customer@example.net\r\n"
SECOND_LISTENER = """
[[listener]]
name = "{name}"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
"""


def test_sighup_adds_a_listener_and_retires_one_whose_open_session_completes(
        tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    p1, p2, p3, mport = free_port(), free_port(), free_port(), free_port()
    base = config(spool=tmp_path / "spool", listen=p1, sink=sink.port, metrics=mport)
    relay = Relay(tmp_path, base + SECOND_LISTENER.format(name="old", port=p2)).start(p1, p2)
    try:
        with smtplib.SMTP("127.0.0.1", p2, timeout=30) as open_session:
            open_session.ehlo("platform.example")
            open_session.mail("agent@example.com")
            open_session.rcpt("customer@example.net")
            relay.config.write_text(base + SECOND_LISTENER.format(name="new", port=p3))
            relay.signal(signal.SIGHUP)
            relay.wait_log(r"reload: config .* applied: 1 listeners added, 1 removed")
            wait_until(lambda: refuses_connections(p2))
            send(p3, subject="via new listener")
            code, reply = open_session.data(HEAD + b"Subject: finished after reload\r\n\r\nok\r\n")
            assert code == 250, reply
        wait_until(lambda: len(sink.messages()) == 2)
        metrics = scrape(mport)
        assert sample(metrics, "relay_config_reloads_total", result="success") >= 2
        assert sample(metrics, "relay_messages_received_total", listener="old") == 1
        assert sample(metrics, "relay_messages_received_total", listener="new") == 1
        assert relay.stop() == 0
    finally:
        relay.stop()
        sink.stop()


def test_invalid_reload_keeps_the_old_config_and_counts_the_failure(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port, mport = free_port(), free_port()
    good = config(spool=tmp_path / "spool", listen=port, sink=sink.port, metrics=mport)
    relay = Relay(tmp_path, good).start(port)
    try:
        relay.config.write_text(good.replace("[[upstream]]", "[[upstream]]\nhots = \"x\""))
        out = relay.cli("reload")
        assert out.returncode == 1
        assert re.search(r"relay\.toml:\d+: upstream\[0\]\.hots: unknown key", out.stderr)
        assert 'did you mean "host"' in out.stderr
        assert "not reloaded; the running relay keeps its current config" in out.stderr
        relay.signal(signal.SIGHUP)
        relay.wait_log(r"reload failed, still running the previous config: .*relay\.toml:\d+")
        metrics = scrape(mport)
        assert sample(metrics, "relay_config_reloads_total", result="failure") == 1
        send(port)                               # the old config still serves
        wait_until(lambda: len(sink.messages()) == 1)
    finally:
        relay.stop()
        sink.stop()


VARIANT = """[[listener.header_rule]]
action = "add"
header = "X-Reload-Variant"
value = "{n}"
"""


def variants(sink: Sink) -> set[bytes]:
    """The X-Reload-Variant values on the messages the sink holds."""
    return {m.split(b"\nX-Reload-Variant: ")[1].split(b"\n")[0] for m in sink.messages()
            if b"\nX-Reload-Variant: " in m}


def test_reload_during_a_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """Six reloads while mail flows, each a real change (a header rule's value) that
    mail received after it carries; nothing lost, nothing twice."""
    sink = Sink(tmp_path).start()
    port = free_port()
    spool = tmp_path / "spool"

    def cfg(n: int) -> str:
        return config(spool=spool, listen=port, sink=sink.port,
                      listener_extra=VARIANT.format(n=n))

    relay = Relay(tmp_path, cfg(0)).start(port)
    senders, most = 4, 150                    # bounded: at most 150 messages per sender
    sent: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def submit(k: int) -> None:
        try:
            for i in range(most):
                if stop.is_set():
                    return
                send(port, subject=f"s{k}-{i}")
                sent.append(f"s{k}-{i}")
        except BaseException as exc:          # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(senders)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: b"0" in variants(sink), timeout=60)
        for n in range(1, 7):                 # bounded: six reloads while mail flows
            relay.config.write_text(cfg(n))
            relay.signal(signal.SIGHUP)
            relay.wait_log(r"reload: config .* applied", count=n, timeout=60)
            # mail accepted after the reload carries the new value: the change applied
            wait_until(lambda n=n: str(n).encode() in variants(sink) or bool(errors),
                       timeout=60)
        stop.set()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert variants(sink) == {str(n).encode() for n in range(7)}
        total = len(sent)
        # relay logs "delivered" after the sink's 250, when its dump file is complete
        relay.wait_log(r"delivered to=", count=total, timeout=120)
        assert relay.log_text().count("delivered to=") == total
        got = subjects(sink)
        assert sorted(got) == sorted(s.encode() for s in sent)
        assert len(set(got)) == total
    finally:
        stop.set()
        relay.stop()
        sink.stop()


def test_sigterm_drains_open_sessions_and_exits_zero(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=port,
                                   sink=sink.port)).start(port)
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("platform.example")
            s.mail("agent@example.com")
            s.rcpt("customer@example.net")
            relay.signal(signal.SIGTERM)
            relay.wait_log(r"stopping: no new sessions")
            wait_until(lambda: refuses_connections(port))
            code, reply = s.data(HEAD + b"Subject: in flight at SIGTERM\r\n\r\nok\r\n")
            assert code == 250, reply
        assert relay.proc is not None
        assert relay.proc.wait(60) == 0
        assert "relay stopped" in relay.log_text()
        queue = tmp_path / "spool" / "queue"
        delivered = len(sink.messages())
        spooled = len([p for p in queue.iterdir() if not p.name.endswith(".state")])
        assert delivered + spooled == 1        # acknowledged: delivered or safely spooled
        assert not list((tmp_path / "spool" / "tmp").iterdir())
    finally:
        relay.stop()
        sink.stop()


def test_prometheus_scrapes_the_running_relay(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=port, sink=sink.port,
                                   metrics=mport)).start(port)
    try:
        send(port)
        wait_until(lambda: len(sink.messages()) == 1)
        lint = check_metrics(scrape(mport).encode())
        assert lint.returncode == 0, lint.stdout + lint.stderr
        with prometheus_server(tmp_path / "prom", [f"127.0.0.1:{mport}"]) as prom:
            prom.wait_for("target up", lambda: any(
                t["health"] == "up" for t in prom.targets()), timeout=60)
            got = prom.wait_for("delivered series", lambda: prom.query(
                'relay_messages_delivered_total{upstream="sink"}'), timeout=60)
            assert float(got[0]["value"][1]) == 1
            for expr in ('relay_delivery_stage_seconds_bucket{le="10.0"}',
                         "relay_queue_messages", "relay_build_info",
                         "relay_config_last_reload_success_timestamp_seconds"):
                assert prom.wait_for(expr, lambda e=expr: prom.query(e), timeout=30)
    finally:
        relay.stop()
        sink.stop()


def test_a_reload_that_fails_half_way_is_abandoned_whole(tmp_path: Path) -> None:
    """Preparing binds the new listeners; when the second cannot bind (its port is taken),
    the plan is abandoned: the first new one is closed again, the old config serves."""
    import socket

    sink = Sink(tmp_path).start()
    port, mport, p_new, p_taken = free_port(), free_port(), free_port(), free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", p_taken))
    taken.listen()
    good = config(spool=tmp_path / "spool", listen=port, sink=sink.port, metrics=mport)
    relay = Relay(tmp_path, good).start(port)
    try:
        relay.config.write_text(good + SECOND_LISTENER.format(name="fresh", port=p_new)
                                + SECOND_LISTENER.format(name="clash", port=p_taken))
        out = relay.cli("reload")
        assert out.returncode == 1, out.stdout + out.stderr
        assert f"127.0.0.1:{p_taken}" in out.stdout + out.stderr
        assert refuses_connections(p_new)            # bound while preparing, then released
        metrics = scrape(mport)
        assert sample(metrics, "relay_config_reloads_total", result="failure") == 1
        send(port, subject="old config still serves")
        wait_until(lambda: len(sink.messages()) == 1)
        relay.config.write_text(good + SECOND_LISTENER.format(name="fresh", port=p_new))
        assert relay.cli("reload").returncode == 0   # the freed port binds on the next try
        send(p_new, subject="via fresh")
        wait_until(lambda: len(sink.messages()) == 2)
    finally:
        taken.close()
        relay.stop()
        sink.stop()
