"""``[relay] event_loop``: uvloop unless the config says "asyncio"; uvloop must be there."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from relay.config import sections
from relay.config.loader import load_config
from relay.errors import ConfigError
from tests.config.conftest import BASE

pytestmark = pytest.mark.fast


def write(tmp_path: Path, line: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(BASE.replace('default_upstream = "out"\n',
                                 f'default_upstream = "out"\n{line}'))
    return path


@pytest.mark.parametrize(("line", "kind"), [
    ("", "uvloop"),
    ('event_loop = "uvloop"\n', "uvloop"),
    ('event_loop = "asyncio"\n', "asyncio"),
], ids=["unset", "uvloop", "asyncio"])
def test_the_default_is_uvloop(tmp_path: Path, line: str, kind: str) -> None:
    assert load_config(write(tmp_path, line)).relay.event_loop == kind


def _without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == "uvloop" else real(name, *args)
    monkeypatch.setattr(sections.importlib.util, "find_spec", find_spec)


def test_uvloop_missing_is_a_config_error_that_names_the_way_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_uvloop(monkeypatch)
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, ""))            # the default needs it too
    text = info.value.explain()
    assert "relay.event_loop: uvloop is not installed" in text
    assert 'event_loop = "asyncio"' in text and "pip install uvloop" in text
    assert load_config(write(tmp_path, 'event_loop = "asyncio"\n')).relay.event_loop == \
        "asyncio"
