"""Table tests for the TOML key-path → line locator."""

from __future__ import annotations

import tomllib

import pytest

from relay.config.locate import Locator

pytestmark = pytest.mark.fast

DOC = '''\
# comment line
title = "x"            # 2

[relay]                # 4
spool = "/var/spool"   # 5
retry.first = "1m"     # 6
"quoted key" = 1       # 7

[relay.extra]          # 9
a = 1                  # 10

[[listener]]           # 12
name = "a"             # 13
allow = [              # 14
  "10.0.0.0/8",        # 15
  # a comment inside
  "cxone-na1",         # 17
]                      # 18
limits = { size = "1MB", count = 3 }   # 19
text = """
[not.a.table]
x = 1
"""                    # 23

[[listener.header_rule]]   # 25
action = "add"             # 26

[[listener.header_rule]]   # 28
header = "X-B"             # 29

[[listener]]               # 31
name = "b"                 # 32
literal = \'\'\'
name = "c"
\'\'\'                     # 35

[[listener.header_rule]]   # 37
header = "X-C"             # 38
[listener.tls]             # 39
mode = "none"              # 40
nested = [[1, 2],          # 41
  [3, 4]]                  # 42
str = "a \\" # not comment" # 43
'''

CASES = [
    (("title",), 2),
    (("relay",), 4),
    (("relay", "spool"), 5),
    (("relay", "retry"), 6),
    (("relay", "retry", "first"), 6),
    (("relay", "quoted key"), 7),
    (("relay", "extra"), 9),
    (("relay", "extra", "a"), 10),
    (("listener",), 12),
    (("listener", 0), 12),
    (("listener", 0, "name"), 13),
    (("listener", 0, "allow"), 14),
    (("listener", 0, "allow", 0), 15),
    (("listener", 0, "allow", 1), 17),
    (("listener", 0, "limits", "size"), 19),
    (("listener", 0, "limits", "count"), 19),
    (("listener", 0, "text"), 20),
    (("listener", 0, "header_rule", 0), 25),
    (("listener", 0, "header_rule", 0, "action"), 26),
    (("listener", 0, "header_rule", 1), 28),
    (("listener", 0, "header_rule", 1, "header"), 29),
    (("listener", 1), 31),
    (("listener", 1, "name"), 32),
    (("listener", 1, "header_rule", 0, "header"), 38),
    (("listener", 1, "tls", "mode"), 40),
    (("listener", 1, "tls", "nested", 0), 41),
    (("listener", 1, "tls", "nested", 1), 42),
    (("listener", 1, "tls", "nested", 1, 0), 42),
    (("listener", 1, "tls", "str"), 43),
]


def test_doc_is_valid_toml() -> None:
    data = tomllib.loads(DOC)
    assert data["listener"][1]["tls"]["str"] == 'a " # not comment'
    assert "not" not in data


@pytest.mark.parametrize(("path", "line"), CASES, ids=[".".join(map(str, c[0])) for c in CASES])
def test_exact_lines(path: tuple[str | int, ...], line: int) -> None:
    assert Locator(DOC).exact(path) == line


def test_missing_key_falls_back_to_its_table() -> None:
    loc = Locator(DOC)
    assert loc.exact(("listener", 1, "listen")) is None
    assert loc.line(("listener", 1, "listen")) == 31
    assert loc.line(("listener", 0, "header_rule", 1, "value")) == 28
    assert loc.line(("metrics", "listen")) is None


def test_array_of_inline_tables() -> None:
    doc = 'listener = [\n  { name = "a" },\n  { name = "b", port = 1 },\n]\n'
    loc = Locator(doc)
    assert loc.exact(("listener", 0, "name")) == 2
    assert loc.exact(("listener", 1, "port")) == 3


def test_dotted_keys_inside_tables_and_crlf() -> None:
    doc = "[a]\r\nb.c.d = 1\r\n\r\n[[e]]\r\nf = 'x'\r\n"
    loc = Locator(doc)
    assert loc.exact(("a", "b", "c", "d")) == 2
    assert loc.exact(("a", "b")) == 2
    assert loc.exact(("e", 0, "f")) == 5


def test_multiline_string_with_quotes_at_end() -> None:
    doc = 'a = """x""""\nb = 2\n'
    assert tomllib.loads(doc)["a"] == 'x"'
    assert Locator(doc).exact(("b",)) == 2


TRICKY = r'''
[ relay . retry ]          # 2
"a.b" = 1                  # 3
'c:\dir\' = 'C:\path\'     # 4
m = """one \""" still
inside"""                  # 6
n = 1_000                  # 7
when = 1979-05-27 07:32:00Z  # 8
f = inf                    # 9
empty = {}                 # 10
arr = [ { x = [1, {y = 2}] }, # 11
  "], [not.a.table", ]     # 12
[[ listener ]]             # 13
name = "x" # trailing     # 14
'''

TRICKY_CASES = [
    (("relay", "retry"), 2), (("relay", "retry", "a.b"), 3), (("relay", "retry", "c:\\dir\\"), 4),
    (("relay", "retry", "m"), 5), (("relay", "retry", "n"), 7), (("relay", "retry", "when"), 8),
    (("relay", "retry", "f"), 9), (("relay", "retry", "empty"), 10),
    (("relay", "retry", "arr", 0, "x", 1, "y"), 11), (("relay", "retry", "arr", 1), 12),
    (("listener", 0), 13), (("listener", 0, "name"), 14),
]


@pytest.mark.parametrize(("path", "line"), TRICKY_CASES)
def test_tricky_lexemes(path: tuple[str | int, ...], line: int) -> None:
    data = tomllib.loads(TRICKY)
    assert data["relay"]["retry"]["m"] == 'one """ still\ninside'
    assert Locator(TRICKY).exact(path) == line


def test_every_shipped_and_fixture_file_scans() -> None:
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    files = [*root.glob("conf/*.toml"), *root.glob("tests/bad_configs/*.toml")]
    assert len(files) > 40
    for f in files:
        text = f.read_text()
        try:
            data = tomllib.loads(text)
        except ValueError:                # TOMLDecodeError, or an int of 4300+ digits
            continue
        loc = Locator(text)
        for key in data:
            assert loc.exact((key,)) is not None, (f, key)
