"""deploy/kubernetes/reload-sidecar.yaml's script, run for real against the relay process.

The kubelet's layout is rebuilt in a temporary directory (``..data`` symlinks that move
atomically when a ConfigMap or Secret changes), the script's paths are mapped into it and
its 15 s poll shortened; everything else runs as shipped. The pid file names an unrelated
process, as a stale one can: the reload must reach relay through its control socket and
the stranger must survive (issue 12: a reload never signals a stranger).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.peers import free_port, wait_until
from tests.peers.relayproc import Relay, config

ROOT = Path(__file__).resolve().parents[2]
SIDECAR = ROOT / "deploy" / "kubernetes" / "reload-sidecar.yaml"


def sidecar_script() -> str:
    (patch,) = [d for d in yaml.safe_load_all(SIDECAR.read_text()) if d]
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["command"][:2] == ["sh", "-c"]
    return str(container["command"][2])


def publish(mount: Path, files: dict[str, str], generation: int) -> None:
    """What the kubelet does: the files in a new ``..<timestamp>`` directory, then the
    ``..data`` symlink swapped to it in one rename; the names point through ``..data``."""
    mount.mkdir(parents=True, exist_ok=True)
    new = mount / f"..2026_12_06_{generation:02d}"
    new.mkdir()
    for name, text in files.items():
        (new / name).write_text(text)
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(Path("..data") / name)
    tmp = mount / "..data_tmp"
    tmp.symlink_to(new.name)
    tmp.rename(mount / "..data")


@pytest.fixture
def stranger() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_the_sidecar_reloads_through_the_control_socket_and_signals_no_stranger(
        tmp_path: Path, stranger: subprocess.Popen[bytes]) -> None:
    etc = tmp_path / "etc"
    spool = tmp_path / "spool"
    port = free_port()
    text = config(spool=spool, listen=port, sink=free_port(), smtp_processes=0)
    publish(etc / "relay", {"relay.toml": text}, 1)
    publish(etc / "relay-tls", {"tls.crt": "", "tls.key": ""}, 1)
    publish(etc / "relay-users", {"users": ""}, 1)
    relay = Relay(tmp_path, text)
    relay.config = etc / "relay" / "relay.toml"      # run on the mounted file itself
    relay.start(port)
    # `relay` on PATH runs this checkout's relay, as the image's console script does.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "relay").write_text(f'#!/bin/sh\nexec {sys.executable} -m relay "$@"\n')
    (bin_dir / "relay").chmod(0o755)
    script = (sidecar_script()
              .replace("/etc/relay-tls/", f"{etc}/relay-tls/")
              .replace("/etc/relay-users/", f"{etc}/relay-users/")
              .replace("/etc/relay/", f"{etc}/relay/")
              .replace("/var/spool/relay", str(spool))
              .replace("sleep 15", "sleep 0.2"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "RELAY_CONFIG": str(etc / "relay" / "relay.toml"),   # the image sets it
           "PYTHONPATH": str(ROOT)}
    log = tmp_path / "sidecar.log"
    with open(log, "wb") as out:
        sidecar = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=subprocess.STDOUT,
                                   env=env, cwd=tmp_path, start_new_session=True)
    try:
        time.sleep(2)                                 # it has read the first state
        (spool / "relay.pid").write_text(f"{stranger.pid}\n")   # a pid file that lies
        second = free_port()
        publish(etc / "relay", {"relay.toml": text + f'''
[[listener]]
name = "second"
protocol = "smtp"
listen = "127.0.0.1:{second}"
tls = "none"
auth = "none"
allow = ["127.0.0.0/8"]
'''}, 2)
        relay.wait_log(r"reload: config .* applied", timeout=60)
        wait_until(lambda: "1 listeners added" in log.read_text(), timeout=60)
        assert stranger.poll() is None, "the sidecar signalled the process relay.pid named"
        assert relay.proc is not None and relay.proc.poll() is None
        # A renewed certificate (a Secret's ..data moves) is a change too.
        publish(etc / "relay-tls", {"tls.crt": "", "tls.key": ""}, 2)
        relay.wait_log(r"reload: config .* applied", count=2, timeout=60)
        assert stranger.poll() is None
    finally:
        os.killpg(sidecar.pid, signal.SIGTERM)
        sidecar.wait(10)
        relay.stop()
