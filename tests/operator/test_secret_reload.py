"""Secrets that change: a password file re-read on reload, mounted like Kubernetes does
(root-owned, 0440, no warning), or handed over as a systemd credential."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.support import relay_cli
from tests.peers import free_port, wait_until
from tests.peers.dante import Dante, dante
from tests.peers.relayproc import Relay, Sink, config, send


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[tuple[Dante, Sink]]:
    sink = Sink(tmp_path).start()
    try:
        with dante(tmp_path / "dante") as d:
            yield d, sink
    finally:
        sink.stop()


def through_dante(tmp_path: Path, d: Dante, sink: Sink, port: int, password_file: str) -> str:
    proxy = f'''via = "dante"

[[proxy]]
name = "dante"
url = "socks5://{d.user}@127.0.0.1:{d.port}"
password_file = "{password_file}"
'''
    return config(spool=tmp_path / "spool", listen=port, sink=sink.port, extra=proxy,
                  retry_first="1h", retry_max="1h", smtp_processes=0)


def test_a_password_file_is_read_again_on_reload(tmp_path: Path,
                                                 peers: tuple[Dante, Sink]) -> None:
    d, sink = peers
    secret = tmp_path / "secrets" / "socks-password"
    secret.parent.mkdir()
    secret.write_text("an old password\n")
    os.chown(secret, 0, 0)
    secret.chmod(0o440)                   # as Kubernetes mounts a secret for the pod's group
    port = free_port()
    relay = Relay(tmp_path, through_dante(tmp_path, d, sink, port, str(secret))).start(port)
    try:
        assert "chmod" not in relay.log_text() and "readable by" not in relay.log_text()
        send(port, subject="rotated")
        relay.wait_log(rf"rejected the username/password of user '{d.user}'")
        relay.wait_log(r"deferred to=<customer@example.net>")
        secret.chmod(0o640)
        secret.write_text(d.password + "\n")            # the secret is rotated in place
        secret.chmod(0o440)
        reload = relay_cli("reload", "-c", str(relay.config))
        assert reload.returncode == 0, reload.stderr
        retry = relay_cli("queue", "retry", "--all", "-c", str(relay.config))
        assert retry.returncode == 0, retry.stderr
        wait_until(lambda: len(sink.messages()) == 1)
        assert d.password not in relay.log_text()
    finally:
        relay.stop()


def test_a_systemd_credential_is_a_password_file(tmp_path: Path,
                                                 peers: tuple[Dante, Sink]) -> None:
    d, sink = peers
    credentials = tmp_path / "credentials"                # what systemd's LoadCredential=
    credentials.mkdir(mode=0o700)                         # makes, private to the service
    (credentials / "secret_socks-password").write_text(d.password)
    (credentials / "secret_socks-password").chmod(0o400)
    port = free_port()
    relay = Relay(tmp_path, through_dante(tmp_path, d, sink, port,
                                          "$CREDENTIALS_DIRECTORY/secret_socks-password"))
    relay.start(port, env={"CREDENTIALS_DIRECTORY": str(credentials)})
    try:
        send(port, subject="credential")
        wait_until(lambda: len(sink.messages()) == 1)
        # Commands run outside the service (no CREDENTIALS_DIRECTORY) still steer it.
        env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
        assert relay_cli("status", "-c", str(relay.config), env=env).returncode == 0
        assert relay_cli("reload", "-c", str(relay.config), env=env).returncode == 0
    finally:
        relay.stop()
