"""The fast lane needs no root: all of it runs green with every privilege dropped.

CI runs the whole suite as root, which would hide a fast test that quietly needs root (a
chown, a privileged port, a mount, reading files that are not ours). So the whole suite
runs the fast lane once more as a process that holds no capabilities at all (setpriv
clears the bounding and inheritable sets and sets no_new_privs): such a process may do
only what any unprivileged user may do with files it owns. Dropping capabilities rather
than switching to another user keeps the check independent of where CI checks out the
repository. tests/conftest.py also fails any fast test that starts a peer, a program or
opens a socket. Not itself fast: it starts a second pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.peers import need

ROOT = Path(__file__).resolve().parents[2]


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` run without any capability (a root process without them is ordinary)."""
    if os.geteuid() != 0:
        return argv                      # already unprivileged
    return [need("setpriv"), "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs",
            "--", *argv]


def test_unprivileged_really_drops_privileges(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    target.write_text("x")
    code = f"import os; os.chown({str(target)!r}, 12345, 12345)"
    out = subprocess.run(unprivileged([sys.executable, "-c", code]), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and "PermissionError" in out.stderr


def test_fast_lane_needs_no_root() -> None:
    home = Path(tempfile.mkdtemp(prefix="relay-fast-lane-"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    try:
        # cwd is home, so hypothesis and pytest write nothing into the checkout.
        lane = subprocess.run(
            unprivileged([sys.executable, "-m", "pytest", "-m", "fast", "-q",
                          "-p", "no:cacheprovider", "-n", "2", str(ROOT / "tests")]),
            cwd=home, env=env, capture_output=True, text=True, timeout=300)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if lane.returncode != 0 or not re.search(r"\d+ passed", lane.stdout):
        pytest.fail(f"the fast lane fails without root (exit {lane.returncode}):\n"
                    f"{lane.stdout[-6000:]}{lane.stderr[-2000:]}", pytrace=False)
