"""Property test: the locator finds the line of every key and item a generated TOML puts."""

from __future__ import annotations

import json
import tomllib
from functools import partial

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config.locate import Locator

pytestmark = pytest.mark.fast

Path_ = tuple[str | int, ...]
dumps = partial(json.dumps, ensure_ascii=False)

keys = st.one_of(st.from_regex(r"[a-z][a-z0-9_-]{0,8}", fullmatch=True),
                 st.text(alphabet='ab.c #="[]\'\\', min_size=1, max_size=6))
strings = st.text(alphabet=st.sampled_from(list('ab "\'\\#[]{}=,.\té日\U0001f600\n')),
                  max_size=12)
scalars = st.one_of(st.integers(-10**6, 10**6), st.booleans(), strings)


def key_text(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else dumps(k)


class Doc:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.want: dict[Path_, int] = {}

    def add(self, text: str, path: Path_ | None = None) -> None:
        self.lines.append(text)
        if path is not None:
            self.want[path] = len(self.lines)

    def pairs(self, base: Path_, items: list[tuple[str, object]], style: int) -> None:
        for k, v in items:
            p = (*base, k)
            if isinstance(v, list):
                if style % 2:
                    self.add(f"{key_text(k)} = [   # comment [", p)
                    for i, item in enumerate(v):
                        self.add(f"  {dumps(item)},", (*p, i))
                    self.add("]")
                else:
                    self.add(f"{key_text(k)} = [{', '.join(dumps(x) for x in v)}]", p)
                    for i in range(len(v)):
                        self.want[(*p, i)] = len(self.lines)
            elif isinstance(v, dict):
                inner = ", ".join(f"{key_text(a)} = {dumps(b)}" for a, b in v.items())
                self.add(f"{key_text(k)} = {{ {inner} }}", p)
                for a in v:
                    self.want[(*p, a)] = len(self.lines)
            else:
                value = dumps(v) if not isinstance(v, bool) else str(v).lower()
                self.add(f"{key_text(k)} = {value}  # {value}", p)


values = st.one_of(scalars, st.lists(strings, max_size=4),
                   st.dictionaries(st.from_regex(r"[a-z]{1,5}", fullmatch=True), scalars,
                                   max_size=3))
pair_lists = st.dictionaries(keys, values, max_size=4).map(lambda d: list(d.items()))


@settings(max_examples=60, deadline=None)
@given(top=pair_lists, tables=st.dictionaries(st.from_regex(r"T[a-z]{1,4}", fullmatch=True),
                                              pair_lists, max_size=3),
       arrays=st.lists(st.tuples(pair_lists, st.lists(pair_lists, max_size=2)), max_size=3),
       style=st.integers(0, 3))
def test_locator_finds_every_generated_line(top: list[tuple[str, object]],
                                            tables: dict[str, list[tuple[str, object]]],
                                            arrays: list[tuple[list[tuple[str, object]],
                                                               list[list[tuple[str, object]]]]],
                                            style: int) -> None:
    doc = Doc()
    doc.add("# generated")
    doc.pairs((), top, style)
    for name, items in tables.items():
        doc.add("")
        doc.add(f"[{name}]", (name,))
        doc.pairs((name,), items, style + 1)
    for i, (items, subs) in enumerate(arrays):
        doc.add(f"[[Entry]]  # {i}", ("Entry", i))
        doc.pairs(("Entry", i), items, style)
        for j, sub in enumerate(subs):
            doc.add("[[Entry.Rule]]", ("Entry", i, "Rule", j))
            doc.pairs(("Entry", i, "Rule", j), sub, style + 1)
    text = "\n".join(doc.lines) + "\n"
    tomllib.loads(text)                                   # the generator writes valid TOML
    loc = Locator(text)
    for path, line in doc.want.items():
        assert loc.exact(path) == line, (path, text)
