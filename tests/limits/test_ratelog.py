"""Rate-limited logging: one line per key per interval, then how many were left out."""

from __future__ import annotations

import logging

import pytest

from relay.ratelog import RateLimitedLog

pytestmark = pytest.mark.fast


def test_one_line_per_interval_then_the_count_of_the_rest(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    caplog.set_level(logging.INFO, logger="test.ratelog")
    rl = RateLimitedLog(logging.getLogger("test.ratelog"), interval=60, clock=lambda: now[0])
    assert rl.log(logging.ERROR, "emfile", "out of descriptors on %s", "smtp")
    for _ in range(5000):
        assert not rl.log(logging.ERROR, "emfile", "out of descriptors on %s", "smtp")
    assert rl.log(logging.ERROR, "enomem", "out of memory")          # another key: its own
    assert rl.suppressed("emfile") == 5000
    now[0] = 61.0
    assert rl.log(logging.ERROR, "emfile", "out of descriptors on %s", "smtp")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["out of descriptors on smtp", "out of memory",
                     "out of descriptors on smtp (5000 more like this in the last 61 s)"]


def test_keys_are_bounded() -> None:
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("test.ratelog"), interval=60, clock=lambda: now[0],
                        max_keys=10)
    for i in range(100):
        now[0] += 1
        rl.log(logging.DEBUG, f"k{i}", "x")
    assert len(rl._last) <= 10
