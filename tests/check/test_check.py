"""`relay check` as operators run it (a subprocess), against real peers for each failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.check.servers import AuthHandler, auth_smtp
from tests.peers import free_port
from tests.peers.dante import Dante
from tests.peers.dovecot import Dovecot, dovecot
from tests.peers.sshd import Sshd, keygen, sshd
from tests.peers.token_server import TokenServer, token_server
from tests.transports.helpers import TLS_NAME, blackhole

MAILBOX = "mbx@example.com"
MAILBOX_PW = "mailbox-password-1"
REFUSAL = ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled "
           "for the Tenant. Visit https://aka.ms/smtp_auth_disabled for more information.")


class Issued:
    def __init__(self, srv: TokenServer) -> None:
        self.srv = srv

    def __contains__(self, token: object) -> bool:
        return token in self.srv.issued


def smtp_upstream(name: str, port: int, ca_file: Path, **extra: str) -> str:
    lines = [f'[[upstream]]\nname = "{name}"\nprotocol = "smtp"\nhost = "127.0.0.1"',
             f'port = {port}\ntls = "starttls"\nca_file = "{ca_file}"',
             f'tls_server_name = "{TLS_NAME}"\nconnect_timeout = "10s"']
    lines += [f'{k} = "{v}"' for k, v in extra.items()]
    return "\n".join(lines) + "\n\n"


class World:
    def __init__(self, tmp: Path, ca: trustme.CA, ca_file: Path, d: Dante, bastion: Sshd,
                 dove: Dovecot, tokens: TokenServer, blackhole_port: int,
                 ports: dict[str, int], handler: AuthHandler) -> None:
        self.config = tmp / "relay.toml"
        self.handler = handler
        self.env = dict(os.environ, DANTE_PW=d.password, DANTE_BADPW="wrong-proxy-pw",
                        MBX_PW=MAILBOX_PW, O365_SECRET=tokens.client_secret,
                        O365_BADSECRET="expired-secret-value", ALICE_PW="alice-pw",
                        ALICE_BADPW="not-alices", SSL_CERT_FILE=str(ca_file))
        socks = f"socks5://{d.user}@127.0.0.1"
        stranger = keygen(tmp / "stranger_key")
        other_host = keygen(tmp / "other_host_key").with_suffix(".pub").read_text().split()
        wrong_known = tmp / "wrong_known_hosts"
        wrong_known.write_text(f"[127.0.0.1]:{bastion.port} {other_host[0]} {other_host[1]}\n")
        alice_token = tmp / "alice.token"
        alice_token.write_text("alice-pw\n")    # Dovecot checks a bearer token like a password
        alice_token.chmod(0o600)
        ssh = f"ssh://{bastion.user}@127.0.0.1:{bastion.port}"
        text = f"""\
[relay]
hostname = "relay.test"
spool = "{tmp / 'spool'}"

[[proxy]]
name = "dante"
url = "{socks}:{d.port}"
password_env = "DANTE_PW"

[[proxy]]
name = "dante-badpw"
url = "{socks}:{d.port}"
password_env = "DANTE_BADPW"

[[proxy]]
name = "firewalled"
url = "{socks}:{blackhole_port}"
password_env = "DANTE_PW"
connect_timeout = "1s"

[[proxy]]
name = "bastion"
url = "ssh://{bastion.user}@127.0.0.1:{bastion.port}"
key_file = "{bastion.client_key}"
known_hosts = "{bastion.known_hosts}"

[[proxy]]
name = "dante-down"
url = "{socks}:{free_port()}"
password_env = "DANTE_PW"

[[proxy]]
name = "bastion-rebuilt"
url = "{ssh}"
key_file = "{bastion.client_key}"
known_hosts = "{wrong_known}"

[[proxy]]
name = "bastion-stranger"
url = "{ssh}"
key_file = "{stranger}"
known_hosts = "{bastion.known_hosts}"

[[token_source]]
name = "alice-static"
kind = "static"
token_file = "{alice_token}"

[[token_source]]
name = "o365"
kind = "client_credentials"
tenant = "tenant-id"
token_url = "{tokens.url}"
client_id = "{tokens.client_id}"
client_secret_env = "O365_SECRET"
via = "dante"

[[token_source]]
name = "o365-expired"
kind = "client_credentials"
tenant = "tenant-id"
token_url = "{tokens.url}"
client_id = "{tokens.client_id}"
client_secret_env = "O365_BADSECRET"

"""
        pw = {"auth": "password", "username": MAILBOX, "password_env": "MBX_PW"}
        text += smtp_upstream("office365", ports["ok"], ca_file, via="dante", **pw)
        text += smtp_upstream("oauth", ports["ok"], ca_file, via="dante", auth="xoauth2",
                              username=MAILBOX, token_source="o365")
        text += smtp_upstream("oauth-expired", ports["ok"], ca_file, auth="xoauth2",
                              username=MAILBOX, token_source="o365-expired")
        text += smtp_upstream("tenant-disabled", ports["refuse"], ca_file, **pw)
        text += smtp_upstream("proxy-timeout", ports["ok"], ca_file, via="firewalled", **pw)
        text += smtp_upstream("proxy-auth", ports["ok"], ca_file, via="dante-badpw", **pw)
        text += smtp_upstream("ruleset", d.blocked_port, ca_file, via="dante", **pw)
        text += smtp_upstream("wrong-name", ports["wrongname"], ca_file, via="dante", **pw)
        text += smtp_upstream("ssh", ports["ok"], ca_file, via="bastion", **pw)
        text += smtp_upstream("ssh-host-key", ports["ok"], ca_file, via="bastion-rebuilt", **pw)
        text += smtp_upstream("ssh-auth", ports["ok"], ca_file, via="bastion-stranger", **pw)
        text += smtp_upstream("proxy-down", ports["ok"], ca_file, via="dante-down", **pw)
        text += (f'[[upstream]]\nname = "imap-oauth"\nprotocol = "imap"\nhost = "127.0.0.1"\n'
                 f'port = {dove.imap}\ntls = "starttls"\nca_file = "{dove.ca_file}"\n'
                 f'auth = "xoauth2"\nusername = "alice"\ntoken_source = "alice-static"\n\n')
        for name, proto, port, var in (("imap", "imap", dove.imap, "ALICE_PW"),
                                       ("imaps", "imap", dove.imaps, "ALICE_PW"),
                                       ("pop3-badpw", "pop3", dove.pop3, "ALICE_BADPW")):
            tls = "implicit" if name == "imaps" else "starttls"
            text += (f'[[upstream]]\nname = "{name}"\nprotocol = "{proto}"\n'
                     f'host = "127.0.0.1"\nport = {port}\ntls = "{tls}"\n'
                     f'ca_file = "{dove.ca_file}"\nvia = "dante"\nauth = "password"\n'
                     f'username = "alice"\npassword_env = "{var}"\n\n')
        self.config.write_text(text)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay", "check", "-c", str(self.config),
                               *args], capture_output=True, text=True, env=self.env,
                              timeout=120)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA, ca_file: Path,
          dante_proxy: Dante) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("check")
    with token_server(ca) as tokens, \
            auth_smtp(ca, users={MAILBOX: MAILBOX_PW}, tokens=Issued(tokens)) as (ok, _h), \
            auth_smtp(ca, refuse=REFUSAL) as (refuse, _r), \
            auth_smtp(ca, names=("mail.other.example",)) as (wrongname, _w), \
            sshd(tmp / "sshd") as bastion, dovecot(users={"alice": "alice-pw"}) as dove, \
            blackhole() as bh:
        yield World(tmp, ca, ca_file, dante_proxy, bastion, dove, tokens, bh,
                    {"ok": ok, "refuse": refuse, "wrongname": wrongname}, _h)


@pytest.fixture(scope="module")
def report(world: World) -> dict[str, Any]:
    proc = world.run("--json")
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] is False
    return {u["name"]: u for u in data["upstreams"]}


def steps(upstream: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in upstream["steps"]}


def failed(upstream: dict[str, Any]) -> dict[str, Any]:
    bad = [s for s in upstream["steps"] if s["ok"] is False]
    assert len(bad) == 1, upstream
    return bad[0]


def test_healthy_upstream_through_dante(report: dict[str, Any]) -> None:
    u = report["office365"]
    assert u["ok"] and u["via"] == "dante"
    s = steps(u)
    assert [x["step"] for x in u["steps"]] == ["proxy", "socks5", "greeting", "tls", "auth"]
    assert s["tls"]["detail"].startswith("TLSv1.")
    # trustme certificates carry no CN, only subjectAltName
    assert f"certificate for {TLS_NAME} valid until 3000-01-01" in s["tls"]["detail"]
    assert s["greeting"]["detail"].startswith("220 ")
    assert f"authenticated as {MAILBOX} (password)" in s["auth"]["detail"]
    assert all(x["seconds"] is not None and x["seconds"] >= 0 for x in u["steps"])


def test_xoauth2_with_token_fetched_through_dante(report: dict[str, Any]) -> None:
    u = report["oauth"]
    assert u["ok"], u
    s = steps(u)
    assert "token source o365: access token obtained, valid until" in s["token"]["detail"]
    assert "(XOAUTH2)" in s["auth"]["detail"]


def test_expired_client_secret(report: dict[str, Any]) -> None:
    f = failed(report["oauth-expired"])
    assert f["step"] == "token" and f["reason"] == "invalid_client"
    assert "secret is wrong or has expired" in f["hint"]


def test_tenant_with_smtp_auth_disabled(report: dict[str, Any]) -> None:
    f = failed(report["tenant-disabled"])
    assert f["step"] == "auth" and "5.7.139" in f["detail"]
    assert "SmtpClientAuthenticationDisabled" in f["hint"]


def test_cisco_connect_timed_out(report: dict[str, Any]) -> None:
    f = failed(report["proxy-timeout"])
    assert f["step"] == "proxy" and f["reason"] == "proxy_unreachable"
    assert f["detail"].startswith("connect timed out")
    assert f["seconds"] < 5


def test_cisco_socks_authentication_failed(report: dict[str, Any]) -> None:
    f = failed(report["proxy-auth"])
    assert f["step"] == "socks5" and f["reason"] == "proxy_auth_failed"
    assert "SOCKS : authentication failed" in f["detail"]
    assert "wrong-proxy-pw" not in json.dumps(report)


def test_destination_refused_by_ruleset(report: dict[str, Any]) -> None:
    f = failed(report["ruleset"])
    assert f["step"] == "socks5" and f["reason"] == "proxy_refused_ruleset"


def test_certificate_name_mismatch_names_both(report: dict[str, Any]) -> None:
    f = failed(report["wrong-name"])
    assert f["step"] == "tls" and f["reason"] == "tls_certificate"
    assert f"expected {TLS_NAME}" in f["detail"]
    assert "mail.other.example" in f["detail"]


def test_ssh_bastion(report: dict[str, Any]) -> None:
    u = report["ssh"]
    assert u["ok"], u
    assert [x["step"] for x in u["steps"]][:2] == ["ssh", "channel"]


def test_ssh_host_key_mismatch(report: dict[str, Any]) -> None:
    f = failed(report["ssh-host-key"])
    assert f["step"] == "ssh" and f["reason"] == "ssh_host_key_mismatch"
    assert "SHA256:" in f["detail"] and "ssh-keyscan" in f["hint"]


def test_ssh_auth_failure(report: dict[str, Any]) -> None:
    f = failed(report["ssh-auth"])
    assert f["step"] == "ssh" and f["reason"] == "ssh_auth_failed"
    assert "authorized_keys" in f["hint"]


def test_proxy_down(report: dict[str, Any]) -> None:
    f = failed(report["proxy-down"])
    assert f["step"] == "proxy" and f["reason"] == "proxy_unreachable"
    assert "connection refused" in f["detail"]


def test_imap_xoauth2_with_static_token(report: dict[str, Any]) -> None:
    u = report["imap-oauth"]
    assert u["ok"], u
    s = steps(u)
    assert "token source alice-static" in s["token"]["detail"]
    assert "(XOAUTH2)" in s["auth"]["detail"]


def test_imap_starttls_and_login(report: dict[str, Any]) -> None:
    u = report["imap"]
    assert u["ok"], u
    assert [x["step"] for x in u["steps"]] == ["proxy", "socks5", "greeting", "capability",
                                               "tls", "auth"]
    assert "STARTTLS" in steps(u)["capability"]["detail"]
    assert report["imaps"]["ok"], report["imaps"]
    assert steps(report["imaps"])["tls"]["detail"].startswith("TLSv1.")


def test_pop3_wrong_password(report: dict[str, Any]) -> None:
    f = failed(report["pop3-badpw"])
    assert f["step"] == "auth" and f["reason"] == "auth_failed"
    assert steps(report["pop3-badpw"])["tls"]["ok"]


def test_text_output_and_exit_codes(world: World) -> None:
    ok = world.run("office365", "imap")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "office365 (smtp 127.0.0.1:" in ok.stdout and "via dante)" in ok.stdout
    assert "  ok    tls   " in ok.stdout and "=> ok" in ok.stdout
    bad = world.run("proxy-timeout", "proxy-auth")
    assert bad.returncode == 1
    assert "  FAIL  proxy " in bad.stdout and "connect timed out" in bad.stdout
    assert "SOCKS : authentication failed" in bad.stdout
    assert "hint: check the username and password of [[proxy]] dante-badpw" in bad.stdout
    unknown = world.run("nope")
    assert unknown.returncode == 1 and "no upstream named nope" in unknown.stderr


def test_check_sends_no_mail_by_default(world: World, report: dict[str, Any]) -> None:
    assert report["oauth"]["ok"]
    assert world.handler.xoauth2 and set(world.handler.xoauth2) == {MAILBOX}
    assert all(rcpts == ["ops@example.net"] for _f, rcpts, _d in world.handler.messages)


def test_send_test_delivers_one_message(world: World) -> None:
    before = len(world.handler.messages)
    proc = world.run("office365", "--send-test", "ops@example.net")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok    send" in proc.stdout and "to ops@example.net" in proc.stdout
    assert len(world.handler.messages) == before + 1
    sender, rcpts, data = world.handler.messages[-1]
    assert (sender, rcpts) == (MAILBOX, ["ops@example.net"])
    assert b"Subject: relay check: test message via office365" in data

