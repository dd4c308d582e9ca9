"""Fixtures for the operations tests."""

from __future__ import annotations

import pytest

from relay.metrics import Metrics
from tests.ops.support import populate


@pytest.fixture
def metrics() -> Metrics:
    """A Metrics instance with every family holding at least one sample."""
    m = Metrics()
    populate(m)
    return m
