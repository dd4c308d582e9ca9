"""SMTP listener processes ([relay] smtp_processes) against the real relay process.

A listener process killed with SIGKILL is replaced and the port keeps answering; a main
process killed with SIGKILL takes its listener processes with it and a restart delivers
everything acknowledged; reload reaches every listener process; /metrics sums them.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.peers import free_port, wait_until
from tests.peers.prometheus import check_metrics
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

SECOND_LISTENER = """
[[listener]]
name = "{name}"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
"""


@pytest.fixture
def smtp_processes() -> int:
    """Overrides the conftest parameter: these tests choose their own process count."""
    return 1


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def listener_pids(relay: Relay) -> list[int]:
    out = relay.cli("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return [int(p) for p in json.loads(out.stdout)["listener_processes"]]


def test_killed_listener_process_is_replaced_and_nothing_acknowledged_is_lost(
        tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=port, sink=sink.port,
                                   smtp_processes=1)).start(port)
    try:
        [child] = listener_pids(relay)
        assert relay.proc is not None and child != relay.proc.pid
        assert re.search(rf"relay\[{child}\]: relay\.smtp: INFO: listener platform",
                         relay.log_text())
        acked = [f"before{i}" for i in range(5) if send(port, subject=f"before{i}")]
        failed: list[str] = []

        def stream() -> None:              # keeps submitting across the kill
            for i in range(20):
                try:
                    send(port, subject=f"during{i}")
                    acked.append(f"during{i}")
                except (OSError, AssertionError):  # cut by the kill: not acknowledged
                    failed.append(f"during{i}")
        t = threading.Thread(target=stream)
        t.start()
        os.kill(child, signal.SIGKILL)
        t.join(120)
        relay.wait_log(rf"SMTP listener process {child} exited unexpectedly "
                       r"\(killed by SIGKILL\)")
        relay.wait_log(rf"SMTP listener process \d+ replaces {child}")
        [new_child] = listener_pids(relay)
        assert new_child != child and alive(new_child) and not alive(child)
        acked += [f"after{i}" for i in range(5) if send(port, subject=f"after{i}")]
        assert len(failed) <= 1                    # only a session the kill cut short
        wait_until(lambda: len(sink.messages()) >= len(acked), timeout=60)
        assert relay.stop() == 0            # every delivery finished and dumped
        got = subjects(sink)
        for name in acked:
            assert got.count(name.encode()) == 1, name
    finally:
        relay.stop()
        sink.stop()


def test_killed_main_process_takes_its_listener_processes_and_restart_delivers(
        tmp_path: Path) -> None:
    blackhole = socket.create_server(("127.0.0.1", 0))     # accepts, never greets
    sink_port = blackhole.getsockname()[1]
    port = free_port()
    spool = tmp_path / "spool"
    cfg = config(spool=spool, listen=port, sink=sink_port, smtp_processes=2)
    relay = Relay(tmp_path, cfg).start(port)
    children = listener_pids(relay)
    assert len(children) == 2
    ids = [send(port, subject=f"k{i}") for i in range(6)]
    relay.kill9()
    wait_until(lambda: not any(alive(p) for p in children), timeout=30)
    blackhole.close()
    sink = Sink(tmp_path, port=sink_port).start()
    try:
        relay = Relay(tmp_path, cfg).start(port)
        for qid in ids:
            relay.wait_log(f"{qid}: delivered", timeout=60)
        assert subjects(sink) == [f"k{i}".encode() for i in range(6)]
        assert relay.stop() == 0
        assert not any(alive(p) for p in listener_pids_or_empty(relay))
    finally:
        relay.stop()
        sink.stop()


def listener_pids_or_empty(relay: Relay) -> list[int]:
    found = re.findall(r"served by \d+ processes \(pids ([\d, ]+)\)", relay.log_text())
    return [int(p) for p in found[-1].split(", ")] if found else []


def test_reload_adds_and_removes_a_listener_in_every_listener_process(
        tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    p1, p2, p3 = free_port(), free_port(), free_port()
    base = config(spool=tmp_path / "spool", listen=p1, sink=sink.port, smtp_processes=2)
    relay = Relay(tmp_path, base + SECOND_LISTENER.format(name="old", port=p2)).start(p1, p2)
    try:
        children = listener_pids(relay)
        assert len(children) == 2
        relay.config.write_text(base + SECOND_LISTENER.format(name="new", port=p3))
        out = relay.cli("reload")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 listeners added, 1 removed, 2 running" in out.stdout
        for pid in children:          # each listener process serves the new listener
            relay.wait_log(rf"relay\[{pid}\]: relay\.smtp: INFO: listener new: SMTP on "
                           rf"127\.0\.0\.1:{p3}")
        wait_until(lambda: refuses_connections(p2))
        for i in range(10):
            send(p3, subject=f"new{i}")
        wait_until(lambda: len(sink.messages()) == 10)
        assert listener_pids(relay) == children     # reconfigured in place, not restarted
        relay.config.write_text(base.replace("smtp_processes = 2", "smtp_processes = 1"))
        out = relay.cli("reload")
        assert out.returncode == 1
        assert "smtp_processes cannot change on reload" in out.stdout + out.stderr
        assert listener_pids(relay) == children
        assert relay.stop() == 0
    finally:
        relay.stop()
        sink.stop()


def test_metrics_sum_over_listener_processes_and_pass_promtool(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=port, sink=sink.port,
                                   metrics=mport, smtp_processes=2)).start(port)
    try:
        n = 12
        for i in range(n):
            send(port, subject=f"m{i}")
        wait_until(lambda: len(sink.messages()) == n)
        # Sessions close in their process just after the client's QUIT: wait for that.
        wait_until(lambda: sample(scrape(mport), "relay_smtp_sessions",
                                  listener="platform") == 0)
        text = scrape(mport)
        assert sample(text, "relay_messages_received_total", listener="platform") == n
        assert sample(text, "relay_messages_delivered_total", upstream="sink",
                      reply_class="2xx") == n
        assert sample(text, "relay_config_reloads_total", result="success") == 1
        assert text.count("\nrelay_build_info{") == 1
        lint = check_metrics(text.encode())
        assert lint.returncode == 0, lint.stdout + lint.stderr
        # A stuck listener process delays a scrape by a bounded wait, then its last values.
        stuck = listener_pids(relay)[1]
        os.kill(stuck, signal.SIGSTOP)
        try:
            started = time.monotonic()
            text = scrape(mport)
            assert time.monotonic() - started < 8
            assert sample(text, "relay_messages_received_total", listener="platform") == n
            relay.wait_log(rf"listener process {stuck} gave no metrics")
        finally:
            os.kill(stuck, signal.SIGCONT)
        # A replaced listener process's counts stay in the sum.
        os.kill(listener_pids(relay)[0], signal.SIGKILL)
        relay.wait_log(r"SMTP listener process \d+ replaces \d+")
        send(port, subject="after")
        wait_until(lambda: sample(scrape(mport), "relay_messages_received_total",
                                  listener="platform") == n + 1)
    finally:
        relay.stop()
        sink.stop()


def test_second_sigterm_ends_every_process_at_once(tmp_path: Path) -> None:
    sink = Sink(tmp_path).start()
    port = free_port()
    relay = Relay(tmp_path, config(spool=tmp_path / "spool", listen=port, sink=sink.port,
                                   smtp_processes=2)).start(port)
    try:
        children = listener_pids(relay)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
            assert held.recv(1024).startswith(b"220")     # a session that never ends
            relay.signal(signal.SIGTERM)
            relay.wait_log(r"stopping: no new sessions")
            relay.signal(signal.SIGTERM)
            assert relay.proc is not None
            relay.proc.wait(10)                            # not the 20 s grace
            wait_until(lambda: not any(alive(p) for p in children), timeout=10)
    finally:
        relay.stop()
        sink.stop()
