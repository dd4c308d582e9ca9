"""Any value in any place of the example config gives a Config or a ConfigError, never a crash."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config.loader import load_config
from relay.errors import ConfigError
from tests.config.conftest import EXAMPLE_ENV

pytestmark = pytest.mark.fast

Path_ = tuple[str | int, ...]


def dump_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(dump_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {dump_value(x)}" for k, x in v.items()) + "}"


def dump(data: dict[str, Any], prefix: str = "") -> str:
    lines: list[str] = []
    later: list[str] = []
    for k, v in data.items():
        name = f"{prefix}{json.dumps(k)}"
        if isinstance(v, dict) and v:
            later.append(f"[{name}]\n" + dump(v, f"{name}."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            later.extend(f"[[{name}]]\n" + dump(x, f"{name}.") for x in v)
        else:
            lines.append(f"{json.dumps(k)} = {dump_value(v)}")
    return "\n".join(lines) + "\n" + "\n".join(later)


def paths(data: Any, base: Path_ = ()) -> list[Path_]:
    out: list[Path_] = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        out.append((*base, k))
        if isinstance(v, dict | list):
            out.extend(paths(v, (*base, k)))
    return out


def replace(data: Any, path: Path_, value: Any) -> None:
    for k in path[:-1]:
        data = data[k]
    data[path[-1]] = value


scalar = st.one_of(st.integers(-2, 70000), st.floats(-1, 1e6, allow_nan=False), st.booleans(),
                   st.sampled_from(["", "x", "35MB", "5m", "127.0.0.1:1", "69,169,235,170",
                                    "office365", "none", "../x", "cxone-na1", "*", "a@b.c",
                                    "socks5://u@h", "ssh://h", "http://127.0.0.1/t"]))
values = st.one_of(scalar, st.lists(scalar, max_size=3),
                   st.dictionaries(st.sampled_from(["name", "x", "host"]), scalar, max_size=2))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_example_never_crashes(example_dir: Path, data: st.DataObject) -> None:
    base = tomllib.loads((example_dir / "relay.toml").read_text())
    path = data.draw(st.sampled_from(paths(base)))
    value = data.draw(values)
    replace(base, path, value)
    target = example_dir / "mutated.toml"
    text = dump(base)
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return                                           # not expressible; skip this draw
    target.write_text(text)
    try:
        load_config(target, environ=EXAMPLE_ENV)
    except ConfigError as exc:
        assert exc.file == str(target)
        assert str(exc).startswith(str(target))


def test_dumped_example_loads_unchanged(example_dir: Path) -> None:
    """The fuzz test's writer reproduces a valid config, so mutations test what they change."""
    target = example_dir / "dumped.toml"
    target.write_text(dump(tomllib.loads((example_dir / "relay.toml").read_text())))
    config = load_config(target, environ=EXAMPLE_ENV)
    assert len(config.listeners) == 4 and len(config.upstreams) == 5
