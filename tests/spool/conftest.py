"""Fixtures of the spool tests: a fresh spool directory per test."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.envelope import Envelope
from relay.spool.store import Spool


def envelope(*recipients: str, sender: str = "agent@example.com", when: float | None = None,
             ) -> Envelope:
    return Envelope(sender=sender, recipients=recipients or ("cust@example.net",),
                    received_at=time.time() if when is None else when, client_ip="10.0.0.5",
                    listener="platform")


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    sp = Spool(tmp_path / "spool")
    sp.recover()
    yield sp
    sp.close()
