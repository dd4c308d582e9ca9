"""Every fault of the catalogue (tests/faults/cases.py) against the real relay process.

Nothing relay acknowledged is lost, nothing it did not acknowledge is delivered, and a
second copy reaches the upstream only where relay counted an unknown outcome.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.faults.cases import FAULTS, Fault
from tests.faults.rig import Rig


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@pytest.mark.parametrize("fault", FAULTS, ids=[slug(f.name) for f in FAULTS])
def test_fault(fault: Fault, tmp_path: Path) -> None:
    run(fault, tmp_path)


def run(fault: Fault, work: Path) -> None:
    """Start relay and its peers, inject the fault, heal, and check the books."""
    with Rig(work, slug(fault.name)[:40], fault.setup) as rig:
        fault.inject(rig)
        rig.settle()
        rig.account(may_duplicate=fault.may_duplicate)


@pytest.mark.fast
def test_the_catalogue_is_big_enough_and_names_are_unique() -> None:
    assert len(FAULTS) >= 25
    assert len({slug(f.name) for f in FAULTS}) == len(FAULTS)
