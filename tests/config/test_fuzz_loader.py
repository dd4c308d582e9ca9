"""Fuzzing the config loader: random documents, mangled example lines, hostile values.

Whatever the file holds, loading gives a Config or a ConfigError that names the file and
a line (``FILE:LINE: ...``), never another exception; and it stays small in memory.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.loader import SECTIONS, load_config
from relay.config.schema import (
    AccountConfig,
    DkimKeyConfig,
    ListenerConfig,
    MetricsConfig,
    ProfileConfig,
    ProxyConfig,
    RelaySection,
    RetryConfig,
    RouteConfig,
    TokenSourceConfig,
    UpstreamConfig,
)
from relay.errors import ConfigError
from tests.config.conftest import EXAMPLE_ENV
from tests.fuzzing import examples

pytestmark = pytest.mark.fast

MEMORY = 32 * 1024 * 1024           # bytes a single load may allocate at its peak

_FIELDS = {
    "relay": RelaySection, "metrics": MetricsConfig, "listener": ListenerConfig,
    "upstream": UpstreamConfig, "route": RouteConfig, "proxy": ProxyConfig,
    "dkim": DkimKeyConfig, "token_source": TokenSourceConfig, "account": AccountConfig,
    "profile": ProfileConfig}
_EXTRA_KEYS = ["url", "password_env", "password_file", "client_secret_env",
               "client_secret_file", "address_sets", "profiles", "networks", "x", ""]
KEYS = {name: sorted({f for f in cls.__dataclass_fields__ if f != "line"} | set(_EXTRA_KEYS))
        for name, cls in _FIELDS.items()}
KEYS["retry"] = sorted(RetryConfig.__dataclass_fields__)
ARRAYS = ("listener", "upstream", "route", "proxy", "dkim", "token_source", "account",
          "profile", "address_set")

class _Huge:
    """An integer of 5000 digits, written out only in the TOML text (Python's int() and
    str() refuse more than 4300 digits, and so does tomllib)."""

    def __repr__(self) -> str:
        return "<1 followed by 4999 ones>"


HUGE = _Huge()
hostile_text = st.sampled_from([
    "", " ", "x", "35MB", "0", "-1", "9" * 400, "9" * 30 + "GB", "1e400", "inf", "nan",
    "5m", "1h30m", "99999999999999999999d", "0.000001ms", "250ms", "127.0.0.1:2525",
    "[::1]:25", "[::1", "::1", "256.1.1.1", "69,169,235,170", "10.0.0.1/33",
    "0.0.0.0/0", "::/0", "office365", "none", "smtp", "imap", "pop3", "outbox",
    "starttls", "implicit", "xoauth2", "passthrough", "../../etc/passwd", "/dev/null",
    "/nonexistent/file", "cxone-na1", "*", "*.example.com", "a@b.c", "<>", "a\x00b",
    "line\nbreak", "tab\there", "\u00e9\u4e2d\U0001f600", "X-Zendesk-*", "Message-ID",
    "socks5://u@127.0.0.1:1080", "socks4://h", "ssh://u@h:22", "ssh://h:99999",
    "https://127.0.0.1/t", "http://example.com/t", "ftp://x", "${HOME}",
])
scalars = st.one_of(
    hostile_text, st.text(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70), st.booleans(),
    st.sampled_from([10**400, -(10**400), HUGE]),   # past float; past int()'s digit limit
    st.floats(allow_nan=True, allow_infinity=True),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(["name", "x", "host", "networks", "action"]), inner,
                    max_size=3)), max_leaves=8)


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is HUGE:
        return "1" * 5000
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v in (float("inf"), float("-inf")):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


@st.composite
def documents(draw: st.DrawFn) -> str:
    """A TOML document shaped like a relay config, with hostile keys and values."""
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 8))):
        section = draw(st.sampled_from([*SECTIONS, "relay.retry", "bogus"]))
        keys = KEYS.get(section.split(".")[-1], ["name", "x", "networks"])
        if section in ARRAYS:
            lines.append(f"[[{section}]]")
        elif draw(st.booleans()):
            lines.append(f"[{section}]")
        else:
            continue
        chosen = draw(st.lists(st.sampled_from(keys), max_size=8, unique=True))
        for key in chosen:
            lines.append(f"{json.dumps(key)} = {toml_value(draw(values))}")
        if section == "listener" and draw(st.booleans()):
            lines.append("[[listener.header_rule]]")
            for key in draw(st.lists(st.sampled_from(["action", "header", "value", "x"]),
                                     max_size=4, unique=True)):
                lines.append(f"{key} = {toml_value(draw(values))}")
    return "\n".join(lines) + "\n"


def check_load(path: Path, *, traced: bool = False) -> None:
    """Load ``path``: a Config, or a ConfigError naming FILE:LINE; with ``traced``, also
    check the memory it took at its peak (tracing makes a load several times slower)."""
    if traced:
        tracemalloc.start()
    try:
        load_config(path, environ=EXAMPLE_ENV)
    except ConfigError as exc:
        text = str(exc)
        assert exc.file == str(path), text
        assert exc.line is not None and exc.line >= 1, f"no line in: {text}"
        assert text.startswith(f"{path}:{exc.line}: "), text
    finally:
        if traced:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert peak < MEMORY, f"loading took {peak / 1e6:.1f} MB"


@examples(60)
@given(doc=documents())
def test_random_documents(example_dir: Path, doc: str) -> None:
    target = example_dir / "random.toml"
    target.write_text(doc)
    check_load(target)


@examples(12)
@given(data=st.data())
def test_mangled_lines_of_the_example(example_dir: Path, data: st.DataObject) -> None:
    lines = (example_dir / "relay.toml").read_text().splitlines()
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(lines) - 1))
        how = data.draw(st.sampled_from(["delete", "duplicate", "swap", "value", "cut",
                                         "insert", "junk"]))
        if how == "delete":
            del lines[i]
        elif how == "duplicate":
            lines.insert(i, lines[i])
        elif how == "swap":
            j = data.draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif how == "value" and "=" in lines[i]:
            key = lines[i].split("=", 1)[0]
            lines[i] = f"{key}= {toml_value(data.draw(values))}"
        elif how == "cut":
            lines[i] = lines[i][:data.draw(st.integers(0, max(0, len(lines[i]) - 1)))]
        elif how == "insert":
            lines.insert(i, data.draw(st.text(max_size=30)).replace("\n", " "))
        else:
            pos = data.draw(st.integers(0, len(lines[i])))
            junk = data.draw(st.sampled_from(['"', "'", "[", "]", "{", "=", "#", "\\",
                                              "\x00", "\x7f", "\ufeff", ",", " ", "."]))
            lines[i] = lines[i][:pos] + junk + lines[i][pos:]
        if not lines:
            lines = [""]
    target = example_dir / "mangled.toml"
    target.write_text("\n".join(lines) + "\n")
    check_load(target, traced=True)


@examples(60)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes(example_dir: Path, raw: bytes) -> None:
    target = example_dir / "bytes.toml"
    target.write_bytes(raw)
    check_load(target, traced=True)
