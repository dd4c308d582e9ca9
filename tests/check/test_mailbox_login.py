"""`relay check` on IMAP/POP3 runs the proxy's own upstream login (against a real Dovecot).

What the check reports must be what a proxy session does: the mechanism the proxy logs in
with (AUTHENTICATE PLAIN / AUTH PLAIN for non-ASCII credentials, LOGIN / USER-PASS
otherwise), and the proxy's refusal to log in over clear text when a starttls server
does not offer STARTTLS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from relay.config.loader import load_config
from relay.config.schema import Config, Secret
from relay.proxy.accounts import build_authenticator
from relay.proxy.upstream import Stage, login_upstream
from relay.tls import client_context
from relay.transports.direct import DirectTransport
from tests.peers import wait_until
from tests.peers.dovecot import Dovecot, dovecot

MAILBOXES = {"alice": "alice-pw", "jorg": "pässwörd"}
ENV = {"ALICE_PW": "alice-pw", "JORG_PW": "pässwörd"}


def upstream(name: str, protocol: str, port: int, tls: str, dove: Dovecot, user: str) -> str:
    return (f'[[upstream]]\nname = "{name}"\nprotocol = "{protocol}"\nhost = "127.0.0.1"\n'
            f'port = {port}\ntls = "{tls}"\nca_file = "{dove.ca_file}"\nauth = "password"\n'
            f'username = "{user}"\npassword_env = "{user.upper()}_PW"\n\n')


@dataclass
class Checked:
    config: Config
    clear: Dovecot                       # a Dovecot without TLS: no STARTTLS, no STLS
    upstreams: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Checked]:
    tmp = tmp_path_factory.mktemp("mailbox-check")
    with dovecot(users=MAILBOXES) as dove, dovecot(users=MAILBOXES, tls=False) as clear:
        text = f'[relay]\nhostname = "relay.test"\nspool = "{tmp / "spool"}"\n\n'
        text += upstream("imap-ascii", "imap", dove.imap, "starttls", dove, "alice")
        text += upstream("imap-utf8", "imap", dove.imap, "starttls", dove, "jorg")
        text += upstream("imaps-utf8", "imap", dove.imaps, "implicit", dove, "jorg")
        text += upstream("pop3-ascii", "pop3", dove.pop3, "starttls", dove, "alice")
        text += upstream("pop3s-utf8", "pop3", dove.pop3s, "implicit", dove, "jorg")
        text += upstream("imap-clear", "imap", clear.imap, "starttls", clear, "alice")
        text += upstream("pop3-clear", "pop3", clear.pop3, "starttls", clear, "alice")
        for name, protocol, port in (("imap-other-name", "imap", dove.imap),
                                     ("pop3-other-name", "pop3", dove.pop3)):
            text += upstream(name, protocol, port, "starttls", dove, "alice").replace(
                "\n\n", '\ntls_server_name = "mail.example.org"\n\n')
        path = tmp / "relay.toml"
        path.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(path),
                               "--json"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, **ENV))
        assert proc.returncode == 1, proc.stdout + proc.stderr      # the last four fail
        report = json.loads(proc.stdout)
        yield Checked(load_config(path, environ=ENV), clear,
                      {u["name"]: u for u in report["upstreams"]})


def steps(upstream: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in upstream["steps"]}


async def proxy_login(config: Config, name: str) -> Stage:
    """Log in as a proxy session for relay user "agent" would; the auth stage it ran."""
    up = next(u for u in config.upstreams if u.name == name)

    async def anyone(_user: str, _password: Secret) -> bool:
        return True

    creds = await build_authenticator(up, config.accounts, anyone).login(
        "agent", Secret("agent-pw"))
    assert creds is not None
    seen: list[Stage] = []
    login = await login_upstream(up, creds, transport=DirectTransport(),
                                 tls_context=client_context(up), observer=seen.append)
    login.channel.close()
    return seen[-1]


@pytest.mark.parametrize(("name", "user", "mechanism"), [
    ("imap-ascii", "alice", "LOGIN"),
    ("imap-utf8", "jorg", "AUTHENTICATE PLAIN"),
    ("imaps-utf8", "jorg", "AUTHENTICATE PLAIN"),
    ("pop3-ascii", "alice", "USER/PASS"),
    ("pop3s-utf8", "jorg", "AUTH PLAIN"),
])
async def test_check_logs_in_with_the_proxys_mechanism(checked: Checked, name: str, user: str,
                                                       mechanism: str) -> None:
    u = checked.upstreams[name]
    assert u["ok"], u
    auth = steps(u)["auth"]
    assert auth["detail"] == f"logged in as {user} ({mechanism})"
    proxy = await proxy_login(checked.config, name)
    assert proxy.name == "auth" and proxy.detail == auth["detail"]


@pytest.mark.parametrize(("name", "command"), [("imap-clear", "STARTTLS"),
                                               ("pop3-clear", "STLS")])
def test_no_login_in_clear_text_when_the_server_offers_no_starttls(checked: Checked, name: str,
                                                                  command: str) -> None:
    u = checked.upstreams[name]
    bad = [s for s in u["steps"] if s["ok"] is False]
    assert [s["step"] for s in u["steps"]] == ["tcp", "greeting", "capability", "tls"]
    assert len(bad) == 1 and bad[0]["step"] == "tls" and bad[0]["reason"] == "starttls"
    # the server's answer to the command the proxy sent, tag and all
    tag = "R1 BAD" if command == "STARTTLS" else "-ERR"
    assert f"refused {command}: {tag} TLS support isn't enabled" in bad[0]["detail"]
    assert "implicit" in bad[0]["hint"]
    wait_until(lambda: checked.clear.log_text().count("no auth attempts") >= 2)
    assert "Login: user=<alice>" not in checked.clear.log_text()


@pytest.mark.parametrize("name", ["imap-other-name", "pop3-other-name"])
def test_certificate_failure_after_starttls_names_what_the_server_presented(
        checked: Checked, name: str) -> None:
    u = checked.upstreams[name]
    assert [s["step"] for s in u["steps"]] == ["tcp", "greeting", "capability", "tls"]
    bad = u["steps"][-1]
    assert bad["ok"] is False and bad["reason"] == "tls_certificate"
    assert "expected mail.example.org" in bad["detail"]
    assert "the server presented a certificate for localhost, 127.0.0.1" in bad["detail"]
