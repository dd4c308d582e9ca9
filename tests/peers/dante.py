"""A private Dante SOCKS5 server on loopback with username auth and a blocked port."""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.peers import free_port, need, running, wait_for_port

# A system account only the tests use; Dante's `socksmethod: username` checks it.
SOCKS_USER = "relaytest-socks"
SOCKS_PASSWORD = "Relay-Socks-Test-7c1f"
_LOCK = Path("/tmp/relaytest-socks-user.lock")


def ensure_system_user(name: str = SOCKS_USER, password: str = SOCKS_PASSWORD) -> None:
    """Create ``name`` (no home, no shell) and set its password; idempotent, worker-safe."""
    with open(_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exists = subprocess.run(["id", "-u", name], capture_output=True).returncode == 0
        if not exists:
            subprocess.run(["useradd", "--system", "-M", "-s", "/usr/sbin/nologin", name],
                           check=True, capture_output=True)
        # chpasswd is idempotent: the same password every time, under the lock.
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True,
                       capture_output=True)


@dataclass(frozen=True)
class Dante:
    host: str
    port: int
    user: str
    password: str
    blocked_port: int          # `socks block` destination port: "not allowed by ruleset"
    log: Path


def _config(log: Path, port: int, blocked: int) -> str:
    return f"""\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: username
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
}}
socks block {{
    from: 0.0.0.0/0 to: 127.0.0.0/8 port = {blocked}
    log: error connect
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: error connect
}}
"""


@contextlib.contextmanager
def dante(tmp: Path, *, blocked_port: int | None = None) -> Iterator[Dante]:
    """Run danted until the block ends; its log is ``tmp/danted.log``."""
    binary = need("danted")
    ensure_system_user()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    blocked = blocked_port or free_port()
    log = tmp / "danted.log"
    conf = tmp / "danted.conf"
    conf.write_text(_config(log, port, blocked))
    check = subprocess.run([binary, "-V", "-f", str(conf)], capture_output=True)
    if check.returncode != 0:
        raise RuntimeError(f"danted rejected its test config:\n{log.read_text(errors='replace')}")
    with running([binary, "-f", str(conf), "-p", str(tmp / "danted.pid"), "-N", "1"],
                 log=tmp / "danted.out") as proc:
        wait_for_port("127.0.0.1", port, proc=proc, log=log)
        yield Dante("127.0.0.1", port, SOCKS_USER, SOCKS_PASSWORD, blocked, log)
