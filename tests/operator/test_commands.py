"""Operator commands find their relay and need none of its secrets; reload signals no stranger."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.operator.support import relay_cli, without
from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, Sink, config

SECRET_VAR = "RELAY_TEST_OPERATOR_SOCKS_PW"


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[Sink]:
    s = Sink(tmp_path).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process that must survive whatever relay's commands do."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


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


def stopped_relay_spool(tmp_path: Path, sink: Sink, pid: int) -> Path:
    """A config whose relay is not running; its pid file names ``pid`` (a stale file)."""
    cfg = tmp_path / "relay.toml"
    cfg.write_text(secret_config(tmp_path, sink, free_port()))
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "lock").touch()
    (spool / "relay.pid").write_text(f"{pid}\n")
    return cfg


def test_reload_never_signals_the_process_a_stale_pid_file_names(
        tmp_path: Path, sink: Sink, stranger: subprocess.Popen[bytes]) -> None:
    cfg = stopped_relay_spool(tmp_path, sink, stranger.pid)
    out = relay_cli("reload", "-c", str(cfg), env=without(SECRET_VAR))
    assert out.returncode == 1
    assert "relay: not reloaded: no process holds the spool lock" in out.stderr
    assert f"names process {stranger.pid}, which was not signalled" in out.stderr
    assert "hint: start relay" in out.stderr
    assert "sent SIGHUP" not in out.stdout + out.stderr
    assert stranger.poll() is None, "relay reload killed an unrelated process"


def test_reload_never_signals_a_lock_holder_that_is_not_relay(
        tmp_path: Path, sink: Sink, stranger: subprocess.Popen[bytes]) -> None:
    cfg = stopped_relay_spool(tmp_path, sink, stranger.pid)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time\n"
         f"f = open({str(tmp_path / 'spool' / 'lock')!r}, 'a')\n"
         "fcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(300)"],
        stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        (tmp_path / "spool" / "relay.pid").write_text(f"{holder.pid}\n")
        out = relay_cli("reload", "-c", str(cfg), env=without(SECRET_VAR))
        assert out.returncode == 1
        assert f"is held by process {holder.pid} (`{sys.executable} -c" in out.stderr
        assert "which is not `relay run`" in out.stderr
        assert holder.poll() is None and stranger.poll() is None
    finally:
        holder.kill()
        holder.wait()


def test_reload_without_control_socket_signals_the_relay_holding_the_lock(
        tmp_path: Path, sink: Sink, stranger: subprocess.Popen[bytes]) -> None:
    port = free_port()
    relay = Relay(tmp_path, secret_config(tmp_path, sink, port))
    relay.start(port, env={SECRET_VAR: "socks-secret"})
    try:
        assert relay.proc is not None
        spool = tmp_path / "spool"
        (spool / "control.sock").unlink()                  # the socket does not answer
        (spool / "relay.pid").write_text(f"{stranger.pid}\n")   # and the pid file lies
        out = relay_cli("reload", "-c", str(relay.config), env=without(SECRET_VAR))
        assert out.returncode == 0, out.stderr
        assert f"sent SIGHUP to relay pid {relay.proc.pid}" in out.stdout
        relay.wait_log(r"reload: config .* applied")
        assert stranger.poll() is None and relay.proc.poll() is None
    finally:
        relay.stop()


@pytest.mark.fast
def test_lock_holders_come_from_the_kernel(tmp_path: Path) -> None:
    from relay.control.hup import lock_holders

    lock = tmp_path / "lock"
    lock.touch()
    assert lock_holders(lock) == []
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        assert lock_holders(lock) == [os.getpid()]
    wait_until(lambda: lock_holders(lock) == [])
