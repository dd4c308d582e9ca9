"""A private Dante SOCKS5 server on loopback with username auth and a blocked port.

Needs root: Dante checks usernames against the system's accounts (so the tests create a
throwaway one per test process) and reads /etc/shadow."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import pwd
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.peers import free_port, need, refuse_in_fast_lane, running, wait_for_port

# Dante's `socksmethod: username` checks a system account, so the tests need one: each test
# process creates its own on first use, with a random password, and removes it when it
# ends (session end, or at exit). Accounts of runs that were killed are swept by the next.
ACCOUNT_PREFIX = "rt-socks-"
_GECOS = "relay test suite, pid "
_LOCK = Path("/tmp/relay-test-accounts.lock")     # useradd/userdel one at a time
_account: tuple[str, str] | None = None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def suite_accounts() -> list[tuple[str, int]]:
    """(name, creating pid) of every account the suite created that still exists."""
    out: list[tuple[str, int]] = []
    for entry in pwd.getpwall():
        if entry.pw_name.startswith(ACCOUNT_PREFIX) and entry.pw_gecos.startswith(_GECOS):
            pid = entry.pw_gecos[len(_GECOS):]
            out.append((entry.pw_name, int(pid) if pid.isdigit() else 0))
    return out


def _userdel(name: str) -> None:
    subprocess.run(["userdel", name], capture_output=True, check=False)


def sweep_stale_accounts() -> list[str]:
    """Remove accounts whose creating test process is gone (a killed run); their names."""
    with _locked():
        stale = [name for name, pid in suite_accounts() if not _alive(pid)]
        for name in stale:
            _userdel(name)
    return stale


def socks_account() -> tuple[str, str]:
    """This test process's throwaway account for Dante: (name, random password)."""
    global _account
    if _account is None:
        refuse_in_fast_lane("useradd")
        sweep_stale_accounts()
        name = ACCOUNT_PREFIX + secrets.token_hex(4)
        password = secrets.token_urlsafe(18)
        with _locked():
            subprocess.run(["useradd", "--system", "-M", "-s", "/usr/sbin/nologin",
                            "-c", f"{_GECOS}{os.getpid()}", name],
                           check=True, capture_output=True)
            subprocess.run(["chpasswd"], input=f"{name}:{password}\n".encode(), check=True,
                           capture_output=True)
        _account = (name, password)
        atexit.register(remove_account)
    return _account


def remove_account() -> None:
    """Remove this process's account, if it made one (tests/conftest.py: session end)."""
    global _account
    if _account is not None and _account[0] in {n for n, _ in suite_accounts()}:
        with _locked():
            _userdel(_account[0])
    _account = None


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
    user, password = socks_account()
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
        yield Dante("127.0.0.1", port, user, password, blocked, log)
