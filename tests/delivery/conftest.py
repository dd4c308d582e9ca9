"""Fixtures for the delivery tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.recording_upstream import RecordingUpstream, stopped_after


@pytest.fixture
async def started() -> AsyncIterator[list[RecordingUpstream]]:
    """Recording upstreams started by the test, stopped afterwards."""
    async with stopped_after() as servers:
        yield servers
