"""Typed access to one parsed TOML table, raising ConfigError with file, line and key path.

Key paths are written ``section[index].key`` (``listener[0].max_message_size``,
``upstream[1].header_rule[0].header``): index-based, 0-based, in file order, so every
entry has a path whether or not it has a name; the line number points at it.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from relay.config.locate import Locator
from relay.config.schema import Secret
from relay.config.values import BadValue
from relay.errors import ConfigError

log = logging.getLogger("relay.config")

T = TypeVar("T")
KeyPath = tuple[str | int, ...]
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _printable(text: str) -> str:
    """``text`` with control characters written as TOML escapes (``\u001b``): a config
    can never put terminal escapes into an error message."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def render_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = part if _BARE_KEY.match(part) else f'"{_printable(part)}"'
            out += f".{text}" if out else text
    return out


def show(value: object) -> str:
    """A short TOML-like rendering of a raw value for ``(got ...)``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + _printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        inner = ", ".join(show(v) for v in value)
        return f"[{inner}]" if len(inner) <= 60 else f"an array of {len(value)} items"
    text = str(value)
    return text if len(text) <= 60 else f"{text[:20]}... ({len(text)} characters)"


def suggest(word: str, choices: Iterable[str]) -> str:
    """``did you mean "x"?`` for a close match, else an empty string."""
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f'did you mean "{close[0]}"?' if close else ""


def one_of(choices: Sequence[str]) -> str:
    quoted = [f'"{c}"' for c in choices]
    return "one of " + ", ".join(quoted) if len(quoted) > 1 else quoted[0]


class Context:
    """What every table of one file shares: its name, locator, base dir and environment."""

    def __init__(self, file: str, text: str, *, base: Path, environ: Mapping[str, str],
                 secrets: bool = True) -> None:
        self.file = file
        self.locator = Locator(text)
        self.base = base
        self.environ = environ
        # False for commands that only talk to the running relay (status, queue, reload's
        # pre-check): secrets are not resolved and private files are not opened, so they
        # work without relay's environment or its permissions.
        self.secrets = secrets

    def line(self, path: KeyPath) -> int | None:
        return self.locator.line(path)

    def error(self, path: KeyPath, message: str, *, got: str | None = None,
              expected: str | None = None, hint: str = "") -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line(path),
                           key=render_path(path), got=got, expected=expected, hint=hint)

    def warn(self, path: KeyPath, message: str) -> None:
        line = self.line(path)
        where = f"{self.file}:{line}" if line else self.file
        log.warning("%s: %s: %s", where, render_path(path), message)

    def resolve(self, value: str) -> Path:
        """Relative paths in a config file resolve against the file's own directory."""
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base / p))


class Table:
    """One TOML table; typed getters record which keys were read for ``finish()``."""

    def __init__(self, ctx: Context, path: KeyPath, raw: Mapping[str, object]) -> None:
        self.ctx = ctx
        self.path = path
        self.raw = raw
        self.known: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.raw

    def error(self, key: str | None, message: str, *, got: str | None = None,
              expected: str | None = None, hint: str = "") -> ConfigError:
        path = self.path if key is None else (*self.path, key)
        return self.ctx.error(path, message, got=got, expected=expected, hint=hint)

    def warn(self, key: str | None, message: str) -> None:
        self.ctx.warn(self.path if key is None else (*self.path, key), message)

    def _get(self, key: str, required: bool, expected: str) -> object | None:
        self.known.add(key)
        if key not in self.raw:
            if required:
                raise self.error(key, "missing required key", expected=expected)
            return None
        return self.raw[key]

    def _typed(self, key: str, kinds: tuple[type, ...], expected: str,
               required: bool) -> object | None:
        value = self._get(key, required, expected)
        if value is None:
            return None
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            raise self.error(key, "wrong type", got=show(value), expected=expected)
        return value

    def text(self, key: str, default: str = "", *, required: bool = False,
            expected: str = "a string", check: Callable[[str], bool] | None = None) -> str:
        value = self._typed(key, (str,), expected, required)
        if value is None:
            return default
        assert isinstance(value, str)
        if check is not None and not check(value):
            raise self.error(key, "invalid value", got=show(value), expected=expected)
        return value

    def opt_text(self, key: str, *, expected: str = "a string",
                check: Callable[[str], bool] | None = None) -> str | None:
        if key not in self.raw:
            self.known.add(key)
            return None
        return self.text(key, expected=expected, check=check)

    def flag(self, key: str, default: bool) -> bool:
        value = self._typed(key, (bool,), "true or false", False)
        return default if value is None else bool(value)

    def integer(self, key: str, default: int | None, *, min: int = 0,
            max: int | None = None) -> int | None:
        rng = f"an integer from {min}" + (f" to {max}" if max is not None else " up")
        value = self._typed(key, (int,), rng, False)
        if value is None:
            return default
        assert isinstance(value, int)
        if value < min or (max is not None and value > max):
            raise self.error(key, "out of range", got=str(value), expected=rng)
        return value

    def enum(self, key: str, choices: Sequence[str], default: str | None = None, *,
             hint: str = "") -> str:
        """One of ``choices``; for another value the error suggests the closest choice,
        or gives ``hint`` when none is close."""
        value = self._typed(key, (str,), one_of(choices), default is None)
        if value is None:
            assert default is not None
            return default
        assert isinstance(value, str)
        if value not in choices:
            raise self.error(key, "unknown value", got=show(value), expected=one_of(choices),
                             hint=suggest(value, choices) or hint)
        return value

    def parsed(self, key: str, parse: Callable[[object], T], default: T, *,
               expected: str, required: bool = False) -> T:
        """A value through one of ``relay.config.values``' parsers."""
        value = self._get(key, required, expected)
        if value is None:
            return default
        try:
            return parse(value)
        except BadValue as exc:
            raise self.error(key, exc.what, got=show(value), expected=exc.expected,
                             hint=exc.hint) from None

    def bounded(self, key: str, parse: Callable[[object], float], default: float, *,
                expected: str, min: float = 0.0, max: float | None = None) -> float:
        value = self.parsed(key, parse, default, expected=expected)
        if value < min or (max is not None and value > max):
            limit = f"at least {min:g}" + (f" and at most {max:g}" if max is not None else "")
            raise self.error(key, "out of range", got=show(self.raw[key]),
                             expected=f"{expected}, {limit}")
        return value

    def str_list(self, key: str, *, expected: str = "an array of strings",
                 check: Callable[[str], bool] | None = None) -> tuple[str, ...]:
        value = self._typed(key, (list,), expected, False)
        if value is None:
            return ()
        assert isinstance(value, list)
        for i, item in enumerate(value):
            if not isinstance(item, str) or (check is not None and not check(item)):
                raise self.ctx.error((*self.path, key, i), "invalid array item",
                                     got=show(item), expected=expected)
        return tuple(value)

    def file(self, key: str, *, required: bool = False, exists: bool = False,
             readable: bool = False, private: bool = False) -> Path | None:
        """A file path, relative to the config file's directory; optionally checked.

        A path starting with ``$CREDENTIALS_DIRECTORY/`` names a systemd credential
        (``LoadCredential=``). ``private`` files (keys, secrets) must not be readable or
        writable by every user; they are not checked when secrets are not resolved.
        """
        text = self.text(key, required=required, expected="a file path")
        if key not in self.raw:
            return None
        if not text:
            raise self.error(key, "empty path", expected="a file path")
        expanded = self._credential(key, text)
        if expanded is None or (private and not self.ctx.secrets):
            return Path(text) if expanded is None else self.ctx.resolve(expanded)
        p = self.ctx.resolve(expanded)
        try:
            p.stat()
        except (FileNotFoundError, NotADirectoryError):
            pass                                  # may not exist (yet): checked below
        except (OSError, ValueError) as exc:      # too long, no access, NUL in the name
            why = getattr(exc, "strerror", None) or str(exc)
            raise self.error(key, f"unusable path ({why})", got=show(text),
                             expected="a file path relay may read",
                             hint="relay cannot even look this path up: fix the name, "
                                  "or the permissions of the directories above it") from None
        if exists and not p.exists():
            where = ("; relative paths start at the config file's directory"
                     if expanded == text else " (a systemd credential: is it named in the "
                     "unit's LoadCredential=?)")
            raise self.error(key, "file does not exist", got=show(text),
                             expected="an existing file", hint=f"looked for {p}{where}")
        if readable:
            check_readable(self, key, p)
        if private:
            refuse_if_exposed(self, key, p)
        return p

    def _credential(self, key: str, text: str) -> str | None:
        """``text`` with a leading ``$CREDENTIALS_DIRECTORY`` expanded (None: unknown here)."""
        for prefix in ("${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"):
            if text == prefix or text.startswith(prefix + "/"):
                base = self.ctx.environ.get("CREDENTIALS_DIRECTORY", "")
                if base:
                    return base + text[len(prefix):]
                if not self.ctx.secrets:
                    return None
                raise self.error(
                    key, "$CREDENTIALS_DIRECTORY is not set", got=show(text),
                    expected="a path that exists here",
                    hint="this path names a systemd credential, which exists only for the "
                         "service systemd starts (LoadCredential= in relay.service); "
                         "`relay reload` checks the file inside the running service, or "
                         "run the check the same way: systemd-run --pipe --wait -p "
                         "LoadCredential=... relay config check")
        return text

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``), each wrapped."""
        full = render_path((*self.path, key))
        if isinstance(self.raw.get(key), dict):
            raise self.error(key, "wrong type", got="a table", expected=f"an array of tables "
                             f"[[{full}]]", hint=f"write [[{full}]] with two brackets: each "
                             "one starts another entry")
        value = self._typed(key, (list,), f"an array of tables [[{full}]]", False)
        if value is None:
            return []
        assert isinstance(value, list)
        out: list[Table] = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self.ctx.error((*self.path, key, i), "wrong type", got=show(item),
                                     expected=f"a table [[{render_path((*self.path, key))}]]")
            out.append(Table(self.ctx, (*self.path, key, i), item))
        return out

    def table(self, key: str) -> Table:
        """A sub-table (``[key]``); an empty one if absent."""
        value = self._typed(key, (dict,), f"a table [{render_path((*self.path, key))}]", False)
        return Table(self.ctx, (*self.path, key), value if isinstance(value, dict) else {})

    def secret(self, name: str) -> Secret | None:
        """``NAME_env`` or ``NAME_file``; an inline ``NAME`` is refused (never echoed)."""
        env_key, file_key = f"{name}_env", f"{name}_file"
        self.known.update((name, env_key, file_key))
        if name in self.raw:
            raise self.error(name, f"an inline {name} is not accepted",
                             expected=f"{env_key} or {file_key}",
                             hint=f'put the {name} in an environment variable ({env_key} = '
                                  f'"VAR") or a file readable only by relay ({file_key} = '
                                  '"/etc/relay/secret"), so it never sits in the config')
        if env_key in self.raw and file_key in self.raw:
            raise self.error(file_key, f"both {env_key} and {file_key} are set",
                             expected="exactly one of them")
        if env_key in self.raw:
            var = self.text(env_key, expected="an environment variable name",
                           check=lambda v: bool(_ENV_NAME.match(v)))
            if not self.ctx.secrets:
                return Secret("", f"env {var}")
            if var not in self.ctx.environ:
                raise self.error(env_key, f"environment variable {var} is not set",
                                 hint=f"export {var} in relay's environment (systemd: "
                                      "Environment= or EnvironmentFile=)")
            value = self.ctx.environ[var]
            if not value:
                raise self.error(env_key, f"environment variable {var} is empty",
                                 hint=f"set {var} to the {name}")
            return Secret(value, f"env {var}")
        if file_key in self.raw:
            p = self.file(file_key, exists=True, readable=True, private=True)
            assert p is not None
            if not self.ctx.secrets:
                return Secret("", f"file {p}")
            try:
                value = p.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise self.error(file_key, f"cannot read the {name} file",
                                 got=show(self.raw[file_key]), hint=f"{p}: {exc}") from None
            if not value:
                raise self.error(file_key, f"{name} file is empty", got=show(self.raw[file_key]),
                                 hint=f"write the {name} into {p}")
            return Secret(value, f"file {p}")
        return None

    def finish(self, *, others: Mapping[str, str] | None = None) -> None:
        """Refuse keys no getter read; ``others`` explains keys valid elsewhere."""
        for key in self.raw:
            if key in self.known:
                continue
            if others and key in others:
                raise self.error(key, others[key])
            hint = suggest(key, self.known)
            raise self.error(key, "unknown key", hint=hint or
                             "see conf/relay.example.toml for every option")


def check_readable(table: Table, key: str, p: Path) -> None:
    if not p.is_file():
        raise table.error(key, "not a regular file", got=show(table.raw[key]),
                          expected="a file", hint=f"{p} is not a file")
    if not os.access(p, os.R_OK):
        raise table.error(key, "file is not readable", got=show(table.raw[key]),
                          hint=f"let the user relay runs as read {p}")


def refuse_if_exposed(table: Table, key: str, p: Path) -> None:
    """A key or secret file every user may read or change is refused; group access is fine
    (Kubernetes mounts secrets root-owned with mode 0440 for the pod's group)."""
    mode = p.stat().st_mode
    exposed = [what for bit, what in ((stat.S_IROTH, "readable"), (stat.S_IWOTH, "writable"))
               if mode & bit]
    if exposed:
        raise table.error(key, f"file is {' and '.join(exposed)} by every user",
                          got=f"mode {stat.S_IMODE(mode):04o}",
                          expected="no access for others (e.g. 0600, 0640 or 0440)",
                          hint=f"run: chmod o-rwx {p}")
