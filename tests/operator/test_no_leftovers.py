"""The test suite leaves no system account behind (Dante's username method needs one)."""

from __future__ import annotations

import pwd
import signal
import subprocess
import sys
from pathlib import Path

from tests.peers.dante import ACCOUNT_PREFIX, suite_accounts, sweep_stale_accounts

ROOT = Path(__file__).resolve().parents[2]
MAKE = ("from tests.peers.dante import socks_account\n"
        "name, password = socks_account()\n"
        "print(name, len(password), flush=True)\n")


def account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def test_an_account_is_made_per_process_with_a_random_password_and_removed() -> None:
    out = [subprocess.run([sys.executable, "-c", MAKE], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True).stdout.split()
           for _ in range(2)]
    names = [name for name, _ in out]
    assert names[0] != names[1] and all(n.startswith(ACCOUNT_PREFIX) for n in names)
    assert all(int(length) >= 20 for _, length in out)
    for name in names:
        assert not account_exists(name), f"{name} outlived the process that made it"


def test_accounts_of_a_killed_run_are_swept_by_the_next() -> None:
    proc = subprocess.Popen([sys.executable, "-c", MAKE + "import time; time.sleep(300)\n"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    name = proc.stdout.readline().split()[0]
    assert (name, proc.pid) in suite_accounts()
    assert name not in sweep_stale_accounts()          # its process still runs: kept
    proc.send_signal(signal.SIGKILL)                   # no atexit, no session end
    proc.wait()
    assert account_exists(name)
    assert name in sweep_stale_accounts()
    assert not account_exists(name)


def test_no_password_is_written_in_the_tests() -> None:
    text = (ROOT / "tests" / "peers" / "dante.py").read_text()
    assert "chpasswd" in text and "token_urlsafe" in text
    assert "relaytest-socks" not in text and "Relay-Socks-Test" not in text
