"""Operator commands find their relay and need none of its secrets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.support import relay_cli, without
from tests.peers import free_port
from tests.peers.relayproc import Relay, Sink, config

SECRET_VAR = "RELAY_TEST_OPERATOR_SOCKS_PW"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()


def secret_config(tmp_path: Path, sink: Sink, port: int, extra: str = "") -> str:
    """The e2e config plus a proxy whose password only relay's environment holds."""
    proxy = f'''
[[proxy]]
name = "dante"
url = "socks5://relay@127.0.0.1:{free_port()}"
password_env = "{SECRET_VAR}"
'''
    return config(spool=tmp_path / "spool", listen=port, sink=sink.port,
                  extra=proxy + extra, smtp_processes=0)


def test_status_queue_and_reload_need_none_of_relays_secrets(tmp_path: Path,
                                                              sink: Sink) -> None:
    port = free_port()
    relay = Relay(tmp_path, secret_config(tmp_path, sink, port))
    relay.start(port, env={SECRET_VAR: "socks-secret"})
    try:
        shell = without(SECRET_VAR)                    # the operator's shell
        cfg = str(relay.config)
        status = relay_cli("status", "-c", cfg, env=shell)
        assert status.returncode == 0, status.stderr
        assert f"relay pid {relay.proc.pid if relay.proc else 0} ready" in status.stdout
        listing = relay_cli("queue", "list", "-c", cfg, env=shell)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.strip() == "Mail queue is empty"
        # The file changes; the shell still lacks the secret; the relay has it and applies it.
        relay.config.write_text(relay.config.read_text() + '\n[[listener]]\nname = "second"'
                                f'\nprotocol = "smtp"\nlisten = "127.0.0.1:{free_port()}"\n'
                                'tls = "none"\nauth = "none"\nallow = ["127.0.0.0/8"]\n')
        reload = relay_cli("reload", "-c", cfg, env=shell)
        assert reload.returncode == 0, reload.stderr
        assert "1 listeners added" in reload.stdout
        assert "socks-secret" not in reload.stdout + reload.stderr
        # The commands that do use secrets still need them: check resolves them.
        check = relay_cli("check", "sink", "-c", cfg, env=shell)
        assert check.returncode == 1
        assert f"environment variable {SECRET_VAR} is not set" in check.stderr
    finally:
        relay.stop()


def test_commands_find_the_config_in_order(tmp_path: Path, sink: Sink) -> None:
    assert not Path("/etc/relay/relay.toml").exists(), \
        "this machine has /etc/relay/relay.toml, which the lookup would find first"
    port = free_port()
    relay = Relay(tmp_path, secret_config(tmp_path, sink, port))
    relay.start(port, env={SECRET_VAR: "socks-secret"})
    try:
        work = tmp_path / "work"
        (work / "conf").mkdir(parents=True)
        (work / "conf" / "relay.toml").write_text(relay.config.read_text())
        shell = without(SECRET_VAR, "RELAY_CONFIG")
        bare = relay_cli("status", cwd=work, env=shell)        # ./conf/relay.toml
        assert bare.returncode == 0, bare.stderr
        named = relay_cli("queue", "list", cwd=tmp_path,
                          env={**shell, "RELAY_CONFIG": str(relay.config)})
        assert named.returncode == 0, named.stderr
        lost = relay_cli("status", cwd=tmp_path, env=shell)
        assert lost.returncode == 1
        assert lost.stderr.startswith("relay: no config file found\n  hint: no -c FILE, "
                                      "$RELAY_CONFIG is not set")
        assert "then /etc/relay/relay.toml, then ./conf/relay.toml" in lost.stderr
    finally:
        relay.stop()
