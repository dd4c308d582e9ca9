"""Helpers for config tests: write a config into a temporary directory and load it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
DATA = REPO / "relay" / "data"          # the shipped profiles and address sets
FILES = REPO / "tests" / "bad_configs" / "files"

BASE = '''\
[relay]
spool = "spool"
default_upstream = "out"

[[listener]]
name = "local"
protocol = "smtp"
listen = "127.0.0.1:2525"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]

[[upstream]]
name = "out"
protocol = "outbox"
path = "outbox"
'''


@pytest.fixture
def example_dir(tmp_path: Path) -> Path:
    """conf/relay.example.toml made loadable: /etc/relay files created under tmp_path."""
    etc, var = tmp_path / "etc", tmp_path / "var"
    for d in (etc / "ssh", etc / "dkim", var):
        d.mkdir(parents=True)
    shutil.copy(FILES / "tls.crt", etc / "tls.crt")
    shutil.copy(FILES / "tls.key", etc / "tls.key")
    shutil.copy(FILES / "tls.crt", etc / "ca.pem")
    shutil.copy(FILES / "id_ed25519", etc / "ssh" / "id_ed25519")
    shutil.copy(FILES / "known_hosts", etc / "ssh" / "known_hosts")
    for name in ("users", "token", "dkim/example.com.rsa.key", "dkim/example.com.ed25519.key"):
        (etc / name).write_text("x\n")
    for p in etc.rglob("*"):
        if p.is_file():
            p.chmod(0o600)
    text = (CONF / "relay.example.toml").read_text()
    text = text.replace("/etc/relay/", f"{etc}/").replace("/var/lib/relay/", f"{var}/")
    (tmp_path / "relay.toml").write_text(text)
    shutil.copy(DATA / "address_sets.toml", tmp_path / "address_sets.toml")
    shutil.copy(DATA / "profiles.toml", tmp_path / "profiles.toml")
    shutil.copy(DATA / "throttle_replies.toml", tmp_path / "throttle_replies.toml")
    return tmp_path


EXAMPLE_ENV = {"GMAIL_APP_PASSWORD": "app-password", "SOCKS_PASSWORD": "socks-pw",
               "O365_CLIENT_SECRET": "client-secret"}
