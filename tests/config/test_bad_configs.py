"""Every tests/bad_configs/NAME.toml fails with exactly the text in NAME.err."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.errors import ConfigError

pytestmark = pytest.mark.fast

BAD = Path(__file__).resolve().parent.parent / "bad_configs"
ENV = {"RELAY_TEST_PASSWORD": "secret"}
CASES = sorted(p.stem for p in BAD.glob("*.toml"))


def test_cases_are_paired_and_plenty() -> None:
    assert {p.stem for p in BAD.glob("*.err")} == set(CASES)
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", CASES)
def test_bad_config(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD.parent)
    expected = (BAD / f"{name}.err").read_text(encoding="utf-8").replace("{dir}", str(BAD))
    with pytest.raises(ConfigError) as exc:
        load_config(f"bad_configs/{name}.toml", environ=ENV)
    assert exc.value.explain() + "\n" == expected
    # FILE:LINE always: the operator goes straight to the line.
    assert exc.value.file == f"bad_configs/{name}.toml"
    assert exc.value.line is not None


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD.parent)
    for name in ("inline_password", "proxy_password_in_url", "inline_client_secret",
                 "pacing_password_in_url"):
        with pytest.raises(ConfigError) as exc:
            load_config(f"bad_configs/{name}.toml", environ=ENV)
        assert "hunter2" not in exc.value.explain()
        assert "abc~123" not in exc.value.explain()
