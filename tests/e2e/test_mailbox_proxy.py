"""The IMAP and POP3 proxy through the real relay process: users file, account mapping, reload."""

from __future__ import annotations

import imaplib
import poplib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import free_port
from tests.peers.dovecot import Dovecot, dovecot
from tests.peers.relayproc import ROOT, Relay, sample, scrape

MESSAGE = (b"From: customer@example.net\r\nTo: support@example.com\r\n"
           b"Subject: where is my order\r\nMessage-ID: <q1@example.net>\r\n\r\nhello\r\n")


@pytest.fixture(autouse=True)
def smtp_processes() -> int:
    """No SMTP listener here: the conftest's two SMTP process layouts would be one run twice."""
    return 0


@pytest.fixture
def dc() -> Iterator[Dovecot]:
    with dovecot(users={"support": "provider-secret"}) as d:
        d.deliver("support", MESSAGE)
        yield d


def add_user(users: Path, name: str, password: str) -> None:
    out = subprocess.run([sys.executable, "-m", "relay", "user", "add", name, "-f", str(users),
                          "--password-stdin"], input=password + "\n", text=True, cwd=ROOT,
                         capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def proxy_config(tmp_path: Path, dc: Dovecot, imap: int, pop3: int, users: Path) -> str:
    return f"""[relay]
hostname = "relay.test"
spool = "{tmp_path / 'spool'}"

[metrics]
enabled = false

[[listener]]
name = "mailbox-imap"
protocol = "imap"
listen = "127.0.0.1:{imap}"
tls = "none"
allow_plaintext_auth = true
users_file = "{users}"
upstream = "provider-imap"

[[listener]]
name = "mailbox-pop3"
protocol = "pop3"
listen = "127.0.0.1:{pop3}"
tls = "none"
allow_plaintext_auth = true
users_file = "{users}"
upstream = "provider-pop3"

[[upstream]]
name = "provider-imap"
protocol = "imap"
host = "127.0.0.1"
port = {dc.imaps}
tls = "implicit"
ca_file = "{dc.ca_file}"
tls_server_name = "localhost"

[[upstream]]
name = "provider-pop3"
protocol = "pop3"
host = "127.0.0.1"
port = {dc.pop3s}
tls = "implicit"
ca_file = "{dc.ca_file}"
tls_server_name = "localhost"

[[account]]
upstream = "provider-imap"
user = "platform"
username = "support"
password_env = "SUPPORT_PASSWORD"

[[account]]
upstream = "provider-pop3"
user = "platform"
username = "support"
password_env = "SUPPORT_PASSWORD"
"""


def test_platform_reads_its_mailbox_through_relay_with_its_own_password(
        tmp_path: Path, dc: Dovecot) -> None:
    users = tmp_path / "users"
    add_user(users, "platform", "platform-pw")
    imap, pop3 = free_port(), free_port()
    relay = Relay(tmp_path, proxy_config(tmp_path, dc, imap, pop3, users))
    try:
        relay.start(imap, pop3, env={"SUPPORT_PASSWORD": "provider-secret"})
        with imaplib.IMAP4("127.0.0.1", imap, timeout=30) as m:
            assert "AUTH=PLAIN" in m.capabilities      # offered even before TLS: loopback
            m.login("platform", "platform-pw")
            typ, data = m.select("INBOX")
            assert (typ, data[0]) == ("OK", b"1")
            typ, msg = m.fetch("1", "(BODY.PEEK[])")
            assert typ == "OK" and msg[0][1] == MESSAGE      # byte for byte
            m.logout()
        with imaplib.IMAP4("127.0.0.1", imap, timeout=30) as m, \
                pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            m.login("platform", "provider-secret")            # the provider's password: no
        pop = poplib.POP3("127.0.0.1", pop3, timeout=30)
        pop.user("platform")
        pop.pass_("platform-pw")
        assert pop.stat()[0] == 1
        assert b"Subject: where is my order" in b"\r\n".join(pop.retr(1)[1])
        pop.quit()
        # one line per session, never a password
        relay.wait_log(r"proxy session listener=mailbox-imap .*user=platform")
        log = relay.log_text()
        assert "platform-pw" not in log and "provider-secret" not in log
        # the wrong password never reached the provider: Dovecot saw logins from relay only
        assert dc.log_text().count("Login: user=<support>") >= 2

        # reload: a second relay user, no restart, the open listener keeps serving
        add_user(users, "agent2", "agent2-pw")
        relay.config.write_text(relay.config.read_text().replace(
            'user = "platform"\nusername = "support"\npassword_env = "SUPPORT_PASSWORD"\n\n'
            '[[account]]\nupstream = "provider-pop3"',
            'user = "platform"\nusername = "support"\npassword_env = "SUPPORT_PASSWORD"\n\n'
            '[[account]]\nupstream = "provider-imap"\nuser = "agent2"\nusername = "support"\n'
            'password_env = "SUPPORT_PASSWORD"\n\n[[account]]\nupstream = "provider-pop3"'))
        relay.signal(signal.SIGHUP)
        relay.wait_log(r"reload: config .* applied")
        with imaplib.IMAP4("127.0.0.1", imap, timeout=30) as m:
            m.login("agent2", "agent2-pw")
            assert m.select("INBOX", readonly=True)[0] == "OK"
            m.logout()
    finally:
        relay.stop()


def test_shipped_defaults_splice_plain_sessions_in_the_kernel(tmp_path: Path) -> None:
    """A config that sets no limits or buffers: plain TCP both legs takes splice(2), and one
    client address holds more sessions than the old per-client cap of 20 (one per mailbox)."""
    with dovecot(users={"support": "provider-secret"}, tls=False) as d:
        d.deliver("support", MESSAGE)
        imap, metrics = free_port(), free_port()
        relay = Relay(tmp_path, f"""[relay]
hostname = "relay.test"
spool = "{tmp_path / 'spool'}"

[metrics]
listen = "127.0.0.1:{metrics}"

[[listener]]
name = "mailbox"
protocol = "imap"
listen = "127.0.0.1:{imap}"
allow_plaintext_auth = true
upstream = "provider"

[[upstream]]
name = "provider"
protocol = "imap"
host = "127.0.0.1"
port = {d.imap}
tls = "none"
auth = "passthrough"
""")
        try:
            relay.start(imap, metrics)
            sessions = []
            for _ in range(30):
                m = imaplib.IMAP4("127.0.0.1", imap, timeout=30)
                m.login("support", "provider-secret")
                sessions.append(m)
            assert sessions[-1].select("INBOX")[0] == "OK"
            typ, msg = sessions[-1].fetch("1", "(BODY.PEEK[])")
            assert typ == "OK" and msg[0][1] == MESSAGE
            for m in sessions:
                assert m.noop()[0] == "OK"
                m.logout()
            text = scrape(metrics)
            assert sample(text, "relay_proxy_splices_total", listener="mailbox",
                          path="kernel") == 30
            assert sample(text, "relay_proxy_splices_total", listener="mailbox",
                          path="transport") == 0
            relay.wait_log(r"proxy session listener=mailbox .*splice=kernel end=", count=30)
        finally:
            relay.stop()
