"""Every end-to-end test runs twice: SMTP listeners in the main process, and in two listener
processes (what the default, "auto", gives a 2-CPU machine: limits counted by the main
process for both)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.peers import relayproc


@pytest.fixture(autouse=True, params=[2, 0], ids=["smtp_processes=2", "smtp_processes=0"])
def smtp_processes(request: pytest.FixtureRequest) -> Iterator[int]:
    saved = relayproc.SMTP_PROCESSES["default"]
    relayproc.SMTP_PROCESSES["default"] = request.param
    try:
        yield int(request.param)
    finally:
        relayproc.SMTP_PROCESSES["default"] = saved
