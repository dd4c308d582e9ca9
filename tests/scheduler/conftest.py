"""Fixtures shared by the scheduler tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.fakes.recording_upstream import RecordingUpstream, stopped_after
from tests.scheduler.rig import Rig


@pytest.fixture
async def rigs() -> AsyncIterator[list[Rig]]:
    """The rigs a test builds (``rig(rigs, ...)``), stopped after it."""
    made: list[Rig] = []
    yield made
    for r in made:
        await r.stop()


@pytest.fixture
async def peers() -> AsyncIterator[list[RecordingUpstream]]:
    """Recording upstreams a test starts, stopped after it."""
    async with stopped_after() as started:
        yield started
