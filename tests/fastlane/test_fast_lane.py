"""The fast lane needs no root: all of it runs green as the unprivileged user ``nobody``.

CI runs the whole suite as root, which would hide a fast test that quietly needs root (a
chown, a mount, a file only root may read). So the whole suite runs the fast lane once
more as ``nobody``; there tests/conftest.py also fails any fast test that starts a peer,
a program or opens a socket. Not itself fast: it starts a second pytest.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.peers import need

ROOT = Path(__file__).resolve().parents[2]


def as_unprivileged(argv: list[str], home: Path) -> list[str]:
    """``argv`` run as ``nobody`` when we are root (else as ourselves: already unprivileged)."""
    if os.geteuid() != 0:
        return argv
    nobody = pwd.getpwnam("nobody")
    os.chown(home, nobody.pw_uid, nobody.pw_gid)
    return [need("setpriv"), f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
            "--clear-groups", "--", *argv]


def test_fast_lane_needs_no_root() -> None:
    home = Path(tempfile.mkdtemp(prefix="relay-fast-lane-"))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "PYTHONPATH": str(ROOT), "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    try:
        probe = subprocess.run(as_unprivileged([sys.executable, "-c", "import relay, pytest"],
                                               home),
                               cwd=home, env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            pytest.fail(f"an unprivileged user cannot run {sys.executable} on {ROOT}: make "
                        "the checkout and its .venv readable by others (chmod -R o+rX)\n"
                        f"{probe.stderr[-2000:]}", pytrace=False)
        # cwd is home, so hypothesis and pytest write nothing into the checkout.
        lane = subprocess.run(
            as_unprivileged([sys.executable, "-m", "pytest", "-m", "fast", "-q",
                             "-p", "no:cacheprovider", "-p", "no:xdist", str(ROOT / "tests")],
                            home),
            cwd=home, env=env, capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if lane.returncode != 0 or not re.search(r"\d+ passed", lane.stdout):
        pytest.fail(f"the fast lane fails without root (exit {lane.returncode}):\n"
                    f"{lane.stdout[-6000:]}{lane.stderr[-2000:]}", pytrace=False)
