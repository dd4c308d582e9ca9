"""Map TOML key paths to the line numbers that defined them (tomllib gives no positions).

The file has already been parsed by ``tomllib`` when this runs, so the text is valid TOML;
this scanner only tracks where each table header, key and array element starts. A path
is a tuple of keys and array indexes, e.g. ``("listener", 0, "allow", 2)``.
"""

from __future__ import annotations

from collections.abc import Iterable

Path_ = tuple[str | int, ...]

_BARE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPES = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


class Locator:
    """Line numbers (1-based) of every table, key and array element in one TOML text."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._lines: dict[Path_, int] = {}
        self._aot_count: dict[Path_, int] = {}   # array-of-tables path -> entries so far
        self._scan()

    def line(self, path: Iterable[str | int]) -> int | None:
        """The line of ``path``, or of its nearest defined ancestor; None if nothing is."""
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
        return None

    def exact(self, path: Iterable[str | int]) -> int | None:
        """The line of ``path`` itself, or None if the text does not define it."""
        return self._lines.get(tuple(path))

    # -- scanning ---------------------------------------------------------------------

    def _lineno(self, pos: int | None = None) -> int:
        return self._text.count("\n", 0, self._pos if pos is None else pos) + 1

    def _peek(self, n: int = 1) -> str:
        return self._text[self._pos:self._pos + n]

    def _skip_ws(self, newlines: bool = False) -> None:
        t = self._text
        while self._pos < len(t):
            c = t[self._pos]
            if c in " \t" or (newlines and c in "\r\n"):
                self._pos += 1
            elif c == "#" and newlines:
                while self._pos < len(t) and t[self._pos] != "\n":
                    self._pos += 1
            else:
                return

    def _skip_comment_line(self) -> None:
        self._skip_ws()
        if self._peek() == "#":
            while self._pos < len(self._text) and self._text[self._pos] != "\n":
                self._pos += 1

    def _scan(self) -> None:
        table: Path_ = ()
        t = self._text
        while True:
            self._skip_ws(newlines=True)
            if self._pos >= len(t):
                return
            line = self._lineno()
            if self._peek(2) == "[[":
                self._pos += 2
                keys = self._key()
                self._pos += 2                      # "]]"
                parent = self._resolve(keys[:-1])
                base = (*parent, keys[-1])
                index = self._aot_count.get(base, 0)
                self._aot_count[base] = index + 1
                table = (*base, index)
                self._lines.setdefault(base, line)
                self._lines[table] = line
            elif self._peek() == "[":
                self._pos += 1
                keys = self._key()
                self._pos += 1                      # "]"
                table = self._resolve(keys)
                self._lines[table] = line
            else:
                keys = self._key()
                self._skip_ws()
                self._pos += 1                      # "="
                path = (*table, *keys)
                for i in range(len(table) + 1, len(path) + 1):
                    self._lines.setdefault(path[:i], line)
                self._lines[path] = line
                self._skip_ws()
                self._value(path)
            self._skip_comment_line()

    def _resolve(self, keys: Path_) -> Path_:
        """A header's keys with the last index inserted after each array of tables."""
        out: list[str | int] = []
        for k in keys:
            out.append(k)
            count = self._aot_count.get(tuple(out))
            if count:
                out.append(count - 1)
        return tuple(out)

    def _key(self) -> Path_:
        parts: list[str | int] = []
        while True:
            self._skip_ws()
            c = self._peek()
            if c == '"':
                parts.append(self._basic_string())
            elif c == "'":
                end = self._text.index("'", self._pos + 1)
                parts.append(self._text[self._pos + 1:end])
                self._pos = end + 1
            else:
                start = self._pos
                while self._pos < len(self._text) and self._text[self._pos] in _BARE:
                    self._pos += 1
                parts.append(self._text[start:self._pos])
            self._skip_ws()
            if self._peek() != ".":
                return tuple(parts)
            self._pos += 1

    def _basic_string(self) -> str:
        t = self._text
        self._pos += 1
        out: list[str] = []
        while t[self._pos] != '"':
            c = t[self._pos]
            if c == "\\":
                nxt = t[self._pos + 1]
                if nxt in "uU":
                    width = 4 if nxt == "u" else 8
                    out.append(chr(int(t[self._pos + 2:self._pos + 2 + width], 16)))
                    self._pos += 2 + width
                    continue
                out.append(_ESCAPES.get(nxt, nxt))
                self._pos += 2
                continue
            out.append(c)
            self._pos += 1
        self._pos += 1
        return "".join(out)

    def _value(self, path: Path_) -> None:
        t = self._text
        for quote in ('"""', "'''"):
            if self._peek(3) == quote:
                end = self._pos + 3
                while t[end:end + 3] != quote:
                    end += 2 if quote == '"""' and t[end] == "\\" else 1
                while t[end + 3:end + 4] == quote[0]:   # up to two quotes may close it
                    end += 1
                self._pos = end + 3
                return
        c = self._peek()
        if c == '"':
            self._basic_string()
        elif c == "'":
            self._pos = t.index("'", self._pos + 1) + 1
        elif c == "[":
            self._pos += 1
            index = 0
            while True:
                self._skip_ws(newlines=True)
                if self._peek() == "]":
                    self._pos += 1
                    return
                item = (*path, index)
                self._lines[item] = self._lineno()
                self._value(item)
                index += 1
                self._skip_ws(newlines=True)
                if self._peek() == ",":
                    self._pos += 1
        elif c == "{":
            self._pos += 1
            while True:
                self._skip_ws()
                if self._peek() == "}":
                    self._pos += 1
                    return
                keys = self._key()
                self._skip_ws()
                self._pos += 1                      # "="
                item = (*path, *keys)
                for i in range(len(path) + 1, len(item) + 1):
                    self._lines.setdefault(item[:i], self._lineno())
                self._skip_ws()
                self._value(item)
                self._skip_ws()
                if self._peek() == ",":
                    self._pos += 1
        else:                                       # number, bool, date-time
            while self._pos < len(t) and t[self._pos] not in ",]}\n#":
                self._pos += 1
