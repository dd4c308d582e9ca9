"""A delivery's stage summary (a string per delivery) is built only for a debug line or
a slow delivery's warning."""

from __future__ import annotations

import logging

import pytest

from relay.outbound.attempt import Deliverer
from relay.timing import StageTimer

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(("level", "seconds", "built"), [
    (logging.INFO, 0.01, 0),            # fast, not debugging: no summary
    (logging.DEBUG, 0.01, 1),           # the debug line carries it
    (logging.INFO, 11.0, 1),            # a slow delivery's warning carries it
])
def test_the_summary_is_built_only_for_a_line_that_shows_it(
        monkeypatch: pytest.MonkeyPatch, level: int, seconds: float, built: int) -> None:
    calls: list[str] = []

    def summary(self: StageTimer) -> str:
        calls.append("summary")
        return "connect=0.010"

    monkeypatch.setattr(StageTimer, "summary", summary)
    deliverer = Deliverer(upstreams=(), transport_for=lambda up: None,  # type: ignore[arg-type,return-value]
                          hostname="relay.test", slow_threshold=10.0)
    timer = StageTimer()
    timer.add("connect", seconds)
    logger = logging.getLogger("relay.delivery")
    before = logger.level
    logger.setLevel(level)                      # (setLevel clears the loggers' caches)
    try:
        deliverer._account_time("office365", "4QbX9k2ZJ7Tq", timer)
    finally:
        logger.setLevel(before)
    assert len(calls) == built
