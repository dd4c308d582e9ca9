"""Fixtures shared by the scheduler tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.scheduler.rig import Rig


@pytest.fixture
async def rigs() -> AsyncIterator[list[Rig]]:
    """The rigs a test builds (``rig(rigs, ...)``), stopped after it."""
    made: list[Rig] = []
    yield made
    for r in made:
        await r.stop()
