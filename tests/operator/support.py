"""Running relay's commands as an operator would: a subprocess, its own environment and cwd."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from tests.peers import refuse_in_fast_lane


def relay_cli(*args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None,
              stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m relay ARGS`` (this checkout's relay) with ``env`` as its whole environment."""
    refuse_in_fast_lane(f"relay (python -m relay {' '.join(args)})")
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd,
                          env=dict(os.environ if env is None else env), input=stdin,
                          capture_output=True, text=True, timeout=timeout, check=False)


def without(*names: str) -> dict[str, str]:
    """This process's environment without ``names`` (an operator's shell lacks relay's)."""
    return {k: v for k, v in os.environ.items() if k not in names}
