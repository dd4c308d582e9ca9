"""Per-client limits stay exact when two SMTP listener processes serve one listener.

Both processes accept from the same socket, so one client's connections land on either;
the main process keeps the one count (as Postfix's anvil does for its smtpd processes).
Each test first checks that its connections really reached both processes (their log
lines carry their pid), since a test whose connections all went to one process could
not tell a shared count from a count per process.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from relay.users import hash_password, write_users
from tests.hostile.test_accounts import lines
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, sample, scrape

USER, PASSWORD = "agent", "agent-pw"


def config(work: Path, port: int, metrics: int, *, per_client: int = 20,
           auth_fail_limit: int = 5) -> str:
    write_users(work / "users", {USER: hash_password(PASSWORD.encode())})
    return f"""[relay]
hostname = "relay.test"
spool = "{work / 'spool'}"
default_upstream = "box"
smtp_processes = 2

[metrics]
listen = "127.0.0.1:{metrics}"

[[listener]]
name = "submit"
protocol = "smtp"
listen = "127.0.0.1:{port}"
tls = "none"
auth = "required"
users_file = "{work / 'users'}"
allow_plaintext_auth = true
max_connections_per_client = {per_client}
auth_fail_limit = {auth_fail_limit}
auth_fail_window = "10m"

[[upstream]]
name = "box"
protocol = "outbox"
path = "{work / 'outbox'}"
"""


def reply(sock: socket.socket) -> str:
    """The last line of the server's next reply ("" when it closed without one)."""
    return (lines(sock) or [""])[-1]


def connect(port: int, source: str) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=20,
                                    source_address=(source, 0))


def listener_pids(relay: Relay) -> list[int]:
    out = relay.cli("status", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return [int(p) for p in json.loads(out.stdout)["listener_processes"]]


def holders(port: int) -> set[int]:
    """The pids holding established connections on the relay's side of ``port``."""
    out = subprocess.run(["ss", "-Htnp", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return {int(p) for p in re.findall(r"pid=(\d+)", out)}


def pids_logging(relay: Relay, pattern: str) -> set[int]:
    return {int(p) for p in re.findall(r"relay\[(\d+)\].*" + pattern, relay.log_text())}


def test_connections_per_client_are_counted_across_processes(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, port, mport, per_client=3)).start(port)
    held: list[socket.socket] = []
    try:
        answers: list[str] = []
        pids = set(listener_pids(relay))
        served: set[int] = set()
        # Which process accepts is the kernel's choice: on a busy machine one can take 16
        # in a row. Keep connecting (at most 64) until both have taken some.
        while len(answers) < 64 and (len(answers) < 16 or not pids <= served):
            s = connect(port, "127.0.4.1")
            answers.append(reply(s))
            held.append(s)
            if len(answers) >= 16:
                served = holders(port) | pids_logging(relay, "stage=CONNECT")
        assert sum(a.startswith("220 ") for a in answers) == 3, answers
        assert all(a.startswith("421 4.7.0 Error: too many connections from your address")
                   for a in answers if not a.startswith("220 ")), answers
        assert pids <= served, (
            f"every connection reached one process ({served}): the test proves nothing")
        metrics = scrape(mport)
        assert sample(metrics, "relay_connections_refused_total", listener="submit",
                      reason="client") == len(answers) - 3
        assert sample(metrics, "relay_smtp_sessions", listener="submit") == 3
        for s in held:                       # the slots come back when sessions end
            s.close()
        held.clear()
        wait_until(lambda: sample(scrape(mport), "relay_smtp_sessions",
                                  listener="submit") == 0, timeout=20)
        again = []
        for _ in range(3):
            s = connect(port, "127.0.4.1")
            again.append(reply(s))
            held.append(s)
        assert all(a.startswith("220 ") for a in again), again
    finally:
        for s in held:
            s.close()
        relay.stop()


def test_a_killed_listener_process_gives_its_slots_back(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, port, mport, per_client=2)).start(port)
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            s = connect(port, "127.0.4.2")
            assert reply(s).startswith("220 ")
            held.append(s)
        before = listener_pids(relay)
        for pid in before:                   # the sessions die with their processes
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: len(set(listener_pids(relay)) - set(before)) == 2, timeout=30)
        for _ in range(2):
            s = connect(port, "127.0.4.2")
            assert reply(s).startswith("220 "), "a dead process's slots were kept"
            held.append(s)
    finally:
        for s in held:
            s.close()
        relay.stop()


def auth(port: int, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=("127.0.5.1", 0)) as s:
        reply(s)
        s.sendall(b"EHLO x\r\n")
        reply(s)
        token = base64.b64encode(f"\0{USER}\0{password}".encode())
        s.sendall(b"AUTH PLAIN " + token + b"\r\n")
        return reply(s)


def test_failed_logins_of_a_network_are_counted_across_processes(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, port, mport, auth_fail_limit=4)).start(port)
    try:
        answers = [auth(port, f"wrong-{i}") for i in range(4)]
        assert all(a.startswith("535 5.7.8") or a.startswith("421 4.7.0") for a in answers), \
            answers
        relay.wait_log(r"client 127\.0\.5\.1 reached 4 failed logins")
        relay.wait_log(r"client 127\.0\.5\.1 refused here too on listener submit", count=2)
        served = pids_logging(relay, "127.0.5.1")
        assert set(listener_pids(relay)) <= served, (
            f"every login reached one process ({served}): the test proves nothing")
        for _ in range(4):                   # on whichever process, the right password too
            assert auth(port, PASSWORD).startswith("454 4.7.0"), "the lockout is per process"
        text = relay.log_text()
        assert len(re.findall(r"client 127\.0\.5\.1 reached", text)) == 1, text
        assert PASSWORD not in text and "wrong-" not in text
        assert sample(scrape(mport), "relay_auth_lockouts_total", protocol="smtp",
                      scope="network") == 1
    finally:
        relay.stop()


def test_a_client_gone_before_the_greeting_leaves_no_session_behind(tmp_path: Path) -> None:
    """EOF while the admission is on its way: the session ends and its slot comes back."""
    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, port, mport, per_client=2)).start(port)
    held: list[socket.socket] = []
    try:
        for _ in range(6):
            with connect(port, "127.0.4.3") as s:
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):            # the relay closes its side too
                    pass
        wait_until(lambda: sample(scrape(mport), "relay_smtp_sessions",
                                  listener="submit") == 0, timeout=20)
        for _ in range(2):
            s = connect(port, "127.0.4.3")
            held.append(s)
            assert reply(s).startswith("220 "), "a slot of a vanished client was kept"
    finally:
        for s in held:
            s.close()
        relay.stop()


def test_a_client_at_its_limit_that_reconnects_on_221_is_never_refused(
        tmp_path: Path) -> None:
    """smtp-source's pattern: as many sessions as the limit, each reconnecting once it has
    read the 221 to QUIT. The slot is released before the 221, and the main process reads
    the other process's pending releases before it refuses anyone."""
    import threading

    port, mport = free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, port, mport, per_client=6)).start(port)
    greetings: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(40):
            with connect(port, "127.0.4.4") as s:
                first = reply(s)
                with lock:
                    greetings.append(first)
                if first.startswith("220 "):
                    s.sendall(b"QUIT\r\n")
                    assert reply(s).startswith("221 ")
    try:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        refused = [g for g in greetings if not g.startswith("220 ")]
        assert len(greetings) == 240 and not refused, refused[:3]
    finally:
        relay.stop()
