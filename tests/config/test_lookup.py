"""Where commands find their config: -c, $RELAY_CONFIG, /etc/relay/relay.toml, ./conf/."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config.lookup import ORDER, find_config
from relay.errors import ConfigError, RelayError

pytestmark = pytest.mark.fast


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(a system config path, a working directory with conf/relay.toml, another file)."""
    system = tmp_path / "etc" / "relay.toml"
    work = tmp_path / "work"
    (work / "conf").mkdir(parents=True)
    (work / "conf" / "relay.toml").write_text("# local\n")
    other = tmp_path / "other.toml"
    other.write_text("# other\n")
    return system, work, other


def test_the_order(places: tuple[Path, Path, Path]) -> None:
    system, work, other = places
    env = {"RELAY_CONFIG": str(other)}
    assert find_config(None, environ={}, system=system, cwd=work) == Path("conf/relay.toml")
    system.parent.mkdir()
    system.write_text("# system\n")
    assert find_config(None, environ={}, system=system, cwd=work) == system
    assert find_config(None, environ=env, system=system, cwd=work) == other
    assert find_config(str(system), environ=env, system=system, cwd=work) == system


@pytest.mark.parametrize("how", ["-c", "env"])
def test_a_named_file_that_is_missing_is_an_error_naming_the_order(
        places: tuple[Path, Path, Path], how: str) -> None:
    system, work, _ = places
    given, env = ("nope.toml", {}) if how == "-c" else (None, {"RELAY_CONFIG": "nope.toml"})
    with pytest.raises(ConfigError) as exc:
        find_config(given, environ=env, system=system, cwd=work)   # never falls back
    text = exc.value.explain()
    source = "given with -c" if how == "-c" else "named by $RELAY_CONFIG"
    assert text == (f"nope.toml: config file not found\n  hint: looked for {work}/nope.toml "
                    f"({source}); relay looks for its config in this order: {ORDER}")


def test_nothing_found_names_every_place(places: tuple[Path, Path, Path],
                                         tmp_path: Path) -> None:
    system, _, _ = places
    with pytest.raises(RelayError) as exc:
        find_config(None, environ={}, system=system, cwd=tmp_path)
    assert str(exc.value) == "no config file found"
    assert exc.value.hint == (
        f"no -c FILE, $RELAY_CONFIG is not set, and neither {system} nor "
        f"{tmp_path}/conf/relay.toml exists; relay looks for its config in this order: "
        "-c FILE, then $RELAY_CONFIG, then /etc/relay/relay.toml, then ./conf/relay.toml "
        "(from the current directory)")


def test_every_config_option_says_the_order() -> None:
    from relay.cli import build_parser

    parser = build_parser()
    assert ORDER.replace("\n", " ") in " ".join(parser.format_help().split())
    for argv in (["run"], ["reload"], ["status"], ["check"], ["queue", "list"],
                 ["config", "check"], ["user", "list"], ["dkim", "check", "x"],
                 ["spf", "check", "x"]):
        sub = parser
        for word in argv:
            actions = [a for a in sub._actions if a.dest in ("command", "config_command",
                                                             "queue_command", "user_command",
                                                             "dkim_command", "spf_command")]
            if not actions:
                break
            sub = actions[0].choices[word]  # type: ignore[index]
        assert ORDER in " ".join(sub.format_help().split()), argv
