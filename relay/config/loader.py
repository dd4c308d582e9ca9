"""Load one TOML config file into a validated ``Config``, or raise ConfigError at FILE:LINE.

Relative paths in a config file resolve against that file's directory. Named address sets
and provider profiles are read from data files (``[relay] address_sets`` / ``profiles``,
default: ``address_sets.toml`` / ``profiles.toml`` beside the config, else the ones
shipped as package data in ``relay/data/``) and then from the config's own entries.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

from relay.config import references
from relay.config.addresses import AddressSets, read_sets
from relay.config.entries import read_dkim, read_profile, read_route
from relay.config.listener import read_listener
from relay.config.pacing import merged, read_pacing, throttle_table
from relay.config.reader import Context, Table, render_path, show, suggest
from relay.config.remote import read_account, read_proxy, read_token_source, read_upstream
from relay.config.schema import (
    Config,
    ListenerConfig,
    ProfileConfig,
    RelaySection,
    RouteConfig,
    ThrottleReplyConfig,
    UpstreamConfig,
)
from relay.config.sections import read_metrics, read_relay
from relay.errors import ConfigError

SECTIONS = ("relay", "metrics", "listener", "upstream", "route", "proxy", "dkim",
            "token_source", "account", "profile", "address_set", "pacing", "throttle_reply")
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


def shipped_data(name: str) -> Path:
    """A data file shipped with relay (``relay/data/NAME``), wherever relay is installed."""
    found = resources.files("relay.data").joinpath(name)
    if not isinstance(found, Path):      # a zipped install: relay is never shipped so
        raise ConfigError(f"relay's data file {name} is not a file on disk ({found})",
                          hint="install relay from its wheel or source (pip install relay)")
    return found


def parse_file(path: Path | str) -> tuple[str, str, dict[str, object]]:
    """Read and parse one TOML file: (display name, text, data), or ConfigError."""
    file = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError("config file not found", file=file,
                          hint=f"looked for {Path(path).resolve()}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", file=file) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError("TOML syntax error: not UTF-8 text", file=file,
                          line=raw.count(b"\n", 0, exc.start) + 1,
                          hint="save the file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigError("TOML syntax error: arrays or inline tables nested too deeply",
                          file=file, line=_deepest_line(text),
                          hint="a config nests a few levels at most: look for a run of "
                               "[ or { on this line") from None
    except ValueError as exc:
        if not isinstance(exc, tomllib.TOMLDecodeError):   # tomllib's int() of 4300+ digits
            long = re.search(r"\d{4300,}", text)
            raise ConfigError("TOML syntax error: a number with thousands of digits",
                              file=file, line=text.count("\n", 0, long.start()) + 1
                              if long else 1,
                              hint="no setting takes a number that large") from None
        msg = str(exc)
        line: int | None = None
        m = _TOML_POS.search(msg)
        if m:
            line, msg = int(m.group(1)), f"{msg[:m.start()]} at column {m.group(2)}"
        elif _TOML_END.search(msg):
            line, msg = text.count("\n") + 1, _TOML_END.sub(" at end of file", msg)
        msg, hint = _friendlier(msg)
        raise ConfigError(f"TOML syntax error: {msg}", file=file, line=line,
                          hint=hint) from None
    return file, text, data


def _deepest_line(text: str, depth: int = 100) -> int | None:
    """The line where ``[``/``{`` first nest ``depth`` deep (strings not considered)."""
    level = 0
    for i, ch in enumerate(text):
        if ch in "[{":
            level += 1
            if level >= depth:
                return text.count("\n", 0, i) + 1
        elif ch in "]}":
            level = max(0, level - 1)
    return None


_SYNTAX_HINT = ('check quotes, brackets and commas on this line (strings need "double '
                'quotes"; booleans are true or false; arrays are [..., ...])')
_TWICE_HINT = "each key and each [table] appears once; [[name]] starts another entry"


def _friendlier(msg: str) -> tuple[str, str]:
    """tomllib's message, with the common operator mistakes named in plain words; a hint."""
    if msg.startswith("Illegal character '\\n'"):
        return f"string not closed before the end of the line ({msg})", _SYNTAX_HINT
    if msg.startswith("Cannot overwrite a value"):
        return f"key set twice ({msg})", _TWICE_HINT
    m = re.match(r"Cannot declare \((.*?),?\) twice", msg)
    if m:
        name = ".".join(part.strip().strip("'\"") for part in m.group(1).split(","))
        return f"table [{name}] declared twice ({msg})", _TWICE_HINT
    return msg, _SYNTAX_HINT


def load_config(path: Path | str, *, environ: Mapping[str, str] | None = None,
                secrets: bool = True) -> Config:
    """Read, validate and type the whole config; the first mistake raises ConfigError.

    ``secrets=False`` checks everything else but resolves no secret (``*_env`` variables
    and ``*_file`` contents are not read; their ``Secret`` values are empty) and opens no
    private key file: for commands that only talk to the running relay.
    """
    file, text, data = parse_file(path)
    base = Path(path).resolve().parent
    ctx = Context(file, text, base=base, environ=os.environ if environ is None else environ,
                  secrets=secrets)
    root = Table(ctx, (), data)
    for key in data:
        if key not in SECTIONS:
            raise ctx.error((key,), "unknown section", hint=suggest(key, SECTIONS) or
                            "sections are " + ", ".join(SECTIONS))
    relay_t = root.table("relay")
    set_files = _data_files(relay_t, "address_sets", base)
    profile_files = _data_files(relay_t, "profiles", base)
    throttle_files = _data_files(relay_t, "throttle_replies", base)

    sets: AddressSets = {}
    for f in set_files:
        _read_data_file(f, "address_set", environ=ctx.environ,
                        read=lambda ts: read_sets(ts, sets, shipped=frozenset()))
    shipped_sets = frozenset(sets)
    read_sets(root.tables("address_set"), sets, shipped=shipped_sets)
    profiles: dict[str, ProfileConfig] = {}
    for f in profile_files:
        _read_data_file(f, "profile", environ=ctx.environ,
                        read=lambda ts: _profiles(ts, profiles, shipped=frozenset()))
    _profiles(root.tables("profile"), profiles, shipped=frozenset(profiles))
    shipped_throttles: dict[str, ThrottleReplyConfig] = {}
    for f in throttle_files:
        _read_data_file(f, "throttle_reply", environ=ctx.environ,
                        read=lambda ts: throttle_table(ts, shipped_throttles))
    own_throttles: dict[str, ThrottleReplyConfig] = {}
    throttle_table(root.tables("throttle_reply"), own_throttles)

    relay = read_relay(relay_t)
    relay_t.finish()
    metrics = read_metrics(root.table("metrics"))
    pacing = read_pacing(root.table("pacing"))
    sets_hint = _sets_hint(set_files)
    listeners = [read_listener(t, sets, sets_hint=sets_hint) for t in root.tables("listener")]
    upstream_tables = root.tables("upstream")
    upstreams = [read_upstream(t) for t in upstream_tables]
    routes = [read_route(t) for t in root.tables("route")]
    proxies = [read_proxy(t) for t in root.tables("proxy")]
    dkim = [read_dkim(t) for t in root.tables("dkim")]
    token_sources = [read_token_source(t) for t in root.tables("token_source")]
    accounts = [read_account(t) for t in root.tables("account")]
    _unique_dkim(ctx, dkim)
    references.check(
        ctx, relay_default=relay.default_upstream, listeners=listeners, upstreams=upstreams,
        upstream_tables=upstream_tables, route_upstreams=[r.upstream for r in routes],
        proxies=[p.name for p in proxies], token_sources=[t.name for t in token_sources],
        token_source_vias=[t.via for t in token_sources], accounts=accounts,
        profiles=list(profiles.values()),
        metrics_listen=metrics.listen if metrics.enabled else None)
    config = Config(
        source=Path(path).resolve(), relay=relay, metrics=metrics,
        listeners=tuple(listeners), upstreams=tuple(upstreams), routes=tuple(routes),
        proxies=tuple(proxies), dkim=tuple(dkim), token_sources=tuple(token_sources),
        accounts=tuple(accounts), profiles=tuple(profiles.values()), address_sets=sets,
        pacing=pacing, throttle_replies=merged(own_throttles, shipped_throttles))
    _check_header_rules(ctx, config)
    return config


def load_relay_section(path: Path | str, *,
                       environ: Mapping[str, str] | None = None) -> RelaySection:
    """Only the ``[relay]`` section (spool, control socket, pid file), validated.

    What ``relay status`` and ``relay queue`` need to find the running relay: they work
    whatever the rest of the file holds, without secrets, keys or relay's permissions.
    """
    file, text, data = parse_file(path)
    ctx = Context(file, text, base=Path(path).resolve().parent,
                  environ=os.environ if environ is None else environ, secrets=False)
    relay_t = Table(ctx, (), data).table("relay")
    relay_t.known.update(("address_sets", "profiles", "throttle_replies"))   # data: not needed
    section = read_relay(relay_t)
    relay_t.finish()
    return section


def read_address_sets(path: Path) -> AddressSets:
    """The named sets of one data file (``address_sets.toml``), for commands run without
    a config; ConfigError at FILE:LINE like the config's own."""
    sets: AddressSets = {}
    _read_data_file(path, "address_set", environ=os.environ,
                    read=lambda ts: read_sets(ts, sets, shipped=frozenset()))
    return sets


def _data_files(relay_t: Table, key: str, base: Path) -> list[Path]:
    """The data files for ``key``: as configured, or the default beside config / shipped."""
    if key in relay_t.raw:
        names = relay_t.str_list(key, expected="an array of file paths")
        files = [relay_t.ctx.resolve(n) for n in names]
        for i, f in enumerate(files):
            if not f.is_file():
                raise relay_t.ctx.error(("relay", key, i), "file does not exist",
                                        got=show(names[i]), expected="an existing TOML file",
                                        hint=f"looked for {f}")
        return files
    relay_t.known.add(key)
    for candidate in (base / f"{key}.toml", shipped_data(f"{key}.toml")):
        if candidate.is_file():
            return [candidate]
    return []


def _read_data_file(path: Path, section: str, *, environ: Mapping[str, str],
                    read: Callable[[list[Table]], None]) -> None:
    file, text, data = parse_file(path)
    ctx = Context(file, text, base=path.parent, environ=environ)
    root = Table(ctx, (), data)
    read(root.tables(section))
    root.finish()


def _profiles(tables: list[Table], into: dict[str, ProfileConfig], *,
              shipped: frozenset[str]) -> None:
    seen: set[str] = set()
    for t in tables:
        p = read_profile(t, into)
        if p.name in seen:
            raise t.error("name", "duplicate profile name", got=show(p.name),
                          expected="a name used once per file")
        seen.add(p.name)
        if p.name in shipped:
            t.warn("name", f'replaces the shipped profile "{p.name}"')
        into[p.name] = p


def _sets_hint(files: Sequence[Path]) -> str:
    if not files:
        return ("no address set files were found: define it with [[address_set]], or set "
                "[relay] address_sets = [\"/etc/relay/address_sets.toml\"]")
    return "define it with [[address_set]] or see " + ", ".join(str(f) for f in files)


def _unique_dkim(ctx: Context, dkim: Sequence[object]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, d in enumerate(dkim):
        k = (getattr(d, "domain", ""), getattr(d, "selector", ""))
        if k in seen:
            raise ctx.error(("dkim", i, "selector"), "duplicate dkim domain and selector",
                            got=f'"{k[0]}" / "{k[1]}"', expected="one key per domain and "
                            "selector", hint=f"dkim[{seen[k]}] already defines it; dual "
                            "signing uses a second selector")
        seen[k] = i
    policy: dict[str, int] = {}
    for i, d in enumerate(dkim):
        domain, on_failure = getattr(d, "domain", ""), getattr(d, "on_failure", "refuse")
        first = policy.setdefault(domain, i)
        if getattr(dkim[first], "on_failure", "refuse") != on_failure:
            raise ctx.error(("dkim", i, "on_failure"), f"dkim keys of {domain} disagree on "
                            "what to do with a message that cannot be signed",
                            got=f'"{on_failure}"',
                            expected=f'"{getattr(dkim[first], "on_failure", "refuse")}", as '
                                     f"dkim[{first}] says",
                            hint="a domain is signed or refused as a whole: give every key "
                                 "of the domain the same on_failure")


def _check_header_rules(ctx: Context, config: Config) -> None:
    """Refuse header rules on protected headers (the rule itself lives in relay.headers)."""
    from relay.headers import check_rules, protected_patterns  # imports the schema: lazy

    patterns = protected_patterns(config.relay)
    groups: tuple[tuple[str, Sequence[ListenerConfig | UpstreamConfig | RouteConfig]], ...] = (
        ("listener", config.listeners), ("upstream", config.upstreams),
        ("route", config.routes))
    for section, entries in groups:
        for i, entry in enumerate(entries):
            for j, rule in enumerate(entry.header_rules):
                path = (section, i, "header_rule", j)
                where = render_path(path)
                try:
                    check_rules([rule], patterns, where=where)
                except ConfigError as exc:
                    raise ctx.error((*path, "header"), exc.detail.removeprefix(f"{where}: "),
                                    hint=exc.hint) from None
