"""`relay config show` output is itself a config that loads back to the same values."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from relay.config.loader import load_config
from relay.config.show import render
from tests.config.conftest import EXAMPLE_ENV

pytestmark = pytest.mark.fast


def without_lines(value: Any) -> Any:
    """The value with every ``line`` field zeroed (lines differ between the two files)."""
    if isinstance(value, tuple):
        return tuple(without_lines(v) for v in value)
    if isinstance(value, dict):
        return {k: without_lines(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: without_lines(getattr(value, f.name))
                   for f in dataclasses.fields(value) if f.name != "line"}
        if any(f.name == "line" for f in dataclasses.fields(value)):
            changes["line"] = 0
        return dataclasses.replace(value, **changes)
    return value


def test_show_round_trips(example_dir: Path) -> None:
    config = load_config(example_dir / "relay.toml", environ=EXAMPLE_ENV)
    shown = render(config)
    for secret in EXAMPLE_ENV.values():
        assert secret not in shown
    again_path = example_dir / "shown.toml"
    again_path.write_text(shown)
    again = load_config(again_path, environ=EXAMPLE_ENV)
    for f in dataclasses.fields(config):
        if f.name != "source":
            assert without_lines(getattr(again, f.name)) == without_lines(
                getattr(config, f.name)), f.name
