"""Every tests/bad_configs/NAME.toml fails with exactly the text in NAME.err."""

from __future__ import annotations

import shutil
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


def private_copy(tmp: Path) -> Path:
    """bad_configs/ copied under ``tmp``, its fixture files 0600 as an operator keeps keys
    (git keeps no modes: checked out, they are readable by everyone, which relay refuses)."""
    copy = tmp / "bad_configs"
    shutil.copytree(BAD, copy)
    for f in (copy / "files").iterdir():
        f.chmod(0o600)
    return copy


@pytest.mark.parametrize("name", CASES)
def test_bad_config(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    copy = private_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    expected = (BAD / f"{name}.err").read_text(encoding="utf-8").replace("{dir}", str(copy))
    with pytest.raises(ConfigError) as exc:
        load_config(f"bad_configs/{name}.toml", environ=ENV)
    assert exc.value.explain() + "\n" == expected
    # FILE:LINE always: the operator goes straight to the line.
    assert exc.value.file == f"bad_configs/{name}.toml"
    assert exc.value.line is not None


def test_secret_values_never_appear_in_errors(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    private_copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    for name in ("inline_password", "proxy_password_in_url", "inline_client_secret",
                 "pacing_password_in_url"):
        with pytest.raises(ConfigError) as exc:
            load_config(f"bad_configs/{name}.toml", environ=ENV)
        assert "hunter2" not in exc.value.explain()
        assert "abc~123" not in exc.value.explain()
