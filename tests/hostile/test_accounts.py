"""A password guess at one account spread over SMTP AUTH and IMAP logins, in the real relay.

SMTP runs in a listener process (and, the second time, in the main process) while the
IMAP proxy runs in the main process: failures of both protocols, from five addresses,
count against the one account; once locked, the right password is refused on both, the
main process logs the account once (never a password), and the metric counts it once.
"""

from __future__ import annotations

import base64
import re
import socket
from pathlib import Path

import pytest

from relay.users import hash_password, write_users
from tests.peers import free_port
from tests.peers.relayproc import Relay, sample, scrape

USER, PASSWORD = "agent", "agent-pw"


def config(work: Path, smtp: int, imap: int, metrics: int, procs: int) -> str:
    write_users(work / "users", {USER: hash_password(PASSWORD.encode())})
    (work / "box.pw").write_text("box-pw\n")
    (work / "box.pw").chmod(0o600)
    return f"""[relay]
hostname = "relay.test"
spool = "{work / 'spool'}"
default_upstream = "box"
smtp_processes = {procs}
account_fail_limit = 4
account_fail_window = "10m"

[metrics]
listen = "127.0.0.1:{metrics}"

[[listener]]
name = "submit"
protocol = "smtp"
listen = "127.0.0.1:{smtp}"
tls = "none"
auth = "required"
users_file = "{work / 'users'}"
allow_plaintext_auth = true

[[listener]]
name = "mailbox"
protocol = "imap"
listen = "127.0.0.1:{imap}"
tls = "none"
allow_plaintext_auth = true
users_file = "{work / 'users'}"
upstream = "provider"

[[upstream]]
name = "box"
protocol = "outbox"
path = "{work / 'outbox'}"

[[upstream]]
name = "provider"
protocol = "imap"
host = "127.0.0.1"
port = {free_port()}
tls = "none"
auth = "password"
username = "box"
password_file = "{work / 'box.pw'}"
"""


def lines(sock: socket.socket) -> list[str]:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().splitlines()


def smtp_auth(port: int, source: str, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        lines(s)
        s.sendall(b"EHLO x\r\n")
        while not lines(s)[-1].startswith("250 "):
            pass
        token = base64.b64encode(f"\0{USER}\0{password}".encode())
        s.sendall(b"AUTH PLAIN " + token + b"\r\n")
        return lines(s)[-1]


def imap_login(port: int, source: str, password: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=20,
                                  source_address=(source, 0)) as s:
        lines(s)
        s.sendall(f"a LOGIN {USER} {password}\r\n".encode())
        return lines(s)[-1]


@pytest.mark.parametrize("procs", [1, 0], ids=["smtp_processes=1", "smtp_processes=0"])
def test_a_guess_spread_over_smtp_and_imap_locks_the_account_everywhere(
        tmp_path: Path, procs: int) -> None:
    smtp, imap, mport = free_port(), free_port(), free_port()
    relay = Relay(tmp_path, config(tmp_path, smtp, imap, mport, procs)).start(smtp, imap)
    try:
        assert smtp_auth(smtp, "127.0.3.1", "wrong-1").startswith("535 5.7.8")
        assert imap_login(imap, "127.0.3.2", "wrong-2").startswith(
            "a NO [AUTHENTICATIONFAILED]")
        assert smtp_auth(smtp, "127.0.3.3", "wrong-3").startswith("535 5.7.8")
        assert imap_login(imap, "127.0.3.4", "wrong-4").startswith(
            "a NO [AUTHENTICATIONFAILED]")                      # the 4th: locked now
        relay.wait_log(r'account "agent" reached 4 failed logins')
        if procs:                            # the listener process hears of it at once
            relay.wait_log(r'account "agent" refused here too')
        assert smtp_auth(smtp, "127.0.3.6", PASSWORD).startswith("454 4.7.0")
        assert imap_login(imap, "127.0.3.7", PASSWORD).startswith(
            "a NO [UNAVAILABLE] Too many failed logins for this account")
        text = relay.log_text()
        assert len(re.findall(r'account "agent" reached', text)) == 1, text
        assert PASSWORD not in text and "wrong-" not in text
        metrics = scrape(mport)
        assert sample(metrics, "relay_auth_lockouts_total", protocol="imap",
                      scope="account") + sample(metrics, "relay_auth_lockouts_total",
                                                protocol="smtp", scope="account") == 1
    finally:
        relay.stop()
