"""What both long-running relay processes (``relay run`` and each SMTP listener process)
set up first: their log line format and the cycle collector's pace."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relay.app.collector import YOUNG_THRESHOLD, pace_collector


def test_a_process_line_keeps_its_format() -> None:
    # In a child: setup_logging changes this process's logging for good.
    code = ("import logging\nfrom relay.app.logs import setup_logging\n"
            "setup_logging('info')\nlogging.getLogger('relay.mail').info('x: received')\n"
            "logging.getLogger('relay').warning('careful')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d relay\[\d+\]: "
    assert re.fullmatch(f"{stamp}relay.mail: INFO: x: received\n"
                        f"{stamp}relay: WARNING: careful\n", out.stderr), out.stderr


class _Paced(Exception):
    pass


class _Started(Exception):
    pass


def _pace_and_stop() -> None:
    raise _Paced


def _never_start(*args: object) -> None:
    raise _Started("relay started without pacing the collector")


def test_both_long_running_processes_pace_the_collector(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from relay.cli import main
    from relay.listenproc.__main__ import main as listener_main

    monkeypatch.setattr("relay.app.collector.pace_collector", _pace_and_stop)
    monkeypatch.setattr("relay.cli.run.pace_collector", _pace_and_stop)
    monkeypatch.setattr("relay.app.logs.setup_logging", lambda level: None)
    monkeypatch.setattr("relay.cli.run.setup_logging", lambda level: None)
    monkeypatch.setattr("relay.app.runtime.App", _never_start)      # nothing runs here
    with pytest.raises(_Paced):
        listener_main(["2147483000", "info", "2147483001"])
    with pytest.raises(_Paced):
        main(["run", "-c", str(Path(__file__).parents[2] / "conf" / "relay.toml")])


def test_pacing_sets_the_young_threshold_only() -> None:
    before = gc.get_threshold()
    try:
        pace_collector()
        assert gc.get_threshold() == (YOUNG_THRESHOLD, before[1], before[2])
    finally:
        gc.set_threshold(*before)
