"""Loading a config for commands that only talk to the running relay: no secret is read."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from relay.config.loader import load_config, load_relay_section
from relay.errors import ConfigError
from tests.config.conftest import BASE, FILES

pytestmark = pytest.mark.fast


def secretive(tmp_path: Path) -> Path:
    """A config whose secrets are out of an operator's reach: an unset variable, a secret
    file that is missing, a TLS key and an SSH key every user may read (refused by run)."""
    for name in ("tls.crt", "tls.key", "id_ed25519", "known_hosts"):
        shutil.copy(FILES / name, tmp_path / name)
        (tmp_path / name).chmod(0o644)
    (tmp_path / "users").write_text("")
    (tmp_path / "users").chmod(0o600)
    path = tmp_path / "relay.toml"
    path.write_text(BASE + f'''
[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1993"
tls = "implicit"
cert = "{tmp_path / 'tls.crt'}"
key = "{tmp_path / 'tls.key'}"
users_file = "{tmp_path / 'users'}"
upstream = "mailbox"

[[upstream]]
name = "mailbox"
protocol = "imap"
host = "imap.example.com"
tls = "implicit"
username = "cc@example.com"
password_file = "{tmp_path / 'not-here'}"
via = "bastion"

[[proxy]]
name = "dante"
url = "socks5://relay@proxy.example.com"
password_env = "UNSET_SOCKS_PASSWORD"

[[proxy]]
name = "bastion"
url = "ssh://relay@bastion.example.com"
key_file = "{tmp_path / 'id_ed25519'}"
known_hosts = "{tmp_path / 'known_hosts'}"

[[token_source]]
name = "o365"
kind = "client_credentials"
tenant = "contoso.onmicrosoft.com"
client_id = "00000000-0000-0000-0000-000000000000"
client_secret_file = "$CREDENTIALS_DIRECTORY/o365-secret"
''')
    return path


def test_run_needs_every_secret(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_config(secretive(tmp_path), environ={})


def test_without_secrets_nothing_secret_is_read(tmp_path: Path) -> None:
    c = load_config(secretive(tmp_path), environ={}, secrets=False)
    proxy = c.proxy("dante")
    assert proxy.password is not None and proxy.password.reveal() == ""
    assert proxy.password.origin == "env UNSET_SOCKS_PASSWORD"
    up = c.upstream("mailbox")
    assert up.password is not None and up.password.origin == f"file {tmp_path / 'not-here'}"
    secret = c.token_source("o365").client_secret
    assert secret is not None and secret.reveal() == ""
    assert secret.origin == "file $CREDENTIALS_DIRECTORY/o365-secret"


def test_without_secrets_mistakes_are_still_found(tmp_path: Path) -> None:
    path = secretive(tmp_path)
    path.write_text(path.read_text().replace('tls = "implicit"\ncert', 'tls = "bogus"\ncert'))
    with pytest.raises(ConfigError) as exc:
        load_config(path, environ={}, secrets=False)
    assert "listener[1].tls: unknown value" in str(exc.value)


def test_the_relay_section_alone(tmp_path: Path) -> None:
    path = secretive(tmp_path)
    path.write_text(path.read_text().replace('tls = "implicit"\ncert', 'tls = "bogus"\ncert')
                    .replace("[relay]\n", '[relay]\ncontrol_socket = "/run/relay.sock"\n'))
    relay = load_relay_section(path, environ={})
    assert relay.spool == tmp_path / "spool"
    assert relay.control_socket == Path("/run/relay.sock")


def test_the_relay_section_alone_is_still_checked(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nspool = "s"\nspoool = "x"\n')
    with pytest.raises(ConfigError) as exc:
        load_relay_section(path)
    assert "relay.spoool: unknown key" in str(exc.value)
