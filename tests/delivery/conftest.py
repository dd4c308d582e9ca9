"""Fixtures for the delivery tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.recording_upstream import RecordingUpstream


@pytest.fixture
async def started() -> AsyncIterator[list[RecordingUpstream]]:
    """Recording upstreams started by the test, stopped afterwards."""
    servers: list[RecordingUpstream] = []
    yield servers
    for s in servers:
        await s.stop()
