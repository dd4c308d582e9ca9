"""Load one TOML config file into a validated ``Config``, or raise ConfigError at FILE:LINE.

Relative paths in a config file resolve against that file's directory. Named address sets
and provider profiles are read from data files (``[relay] address_sets`` / ``profiles``,
default: ``address_sets.toml`` / ``profiles.toml`` beside the config, else the ones
shipped in the source tree's ``conf/``) and then from the config's own entries.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from relay.config import references
from relay.config.addresses import AddressSets, read_sets
from relay.config.entries import read_dkim, read_profile, read_route
from relay.config.reader import Context, Table, render_path, show, suggest
from relay.config.remote import read_account, read_proxy, read_token_source, read_upstream
from relay.config.schema import (
    Config,
    ListenerConfig,
    ProfileConfig,
    RouteConfig,
    UpstreamConfig,
)
from relay.config.sections import read_listener, read_metrics, read_relay
from relay.errors import ConfigError

SECTIONS = ("relay", "metrics", "listener", "upstream", "route", "proxy", "dkim",
            "token_source", "account", "profile", "address_set")
_TOML_POS = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")


def shipped_conf_dir() -> Path:
    """``conf/`` of the source tree relay runs from (holds the shipped data files)."""
    return Path(__file__).resolve().parents[2] / "conf"


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
    except tomllib.TOMLDecodeError as exc:
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


def load_config(path: Path | str, *, environ: Mapping[str, str] | None = None) -> Config:
    """Read, validate and type the whole config; the first mistake raises ConfigError."""
    file, text, data = parse_file(path)
    base = Path(path).resolve().parent
    ctx = Context(file, text, base=base, environ=os.environ if environ is None else environ)
    root = Table(ctx, (), data)
    for key in data:
        if key not in SECTIONS:
            raise ctx.error((key,), "unknown section", hint=suggest(key, SECTIONS) or
                            "sections are " + ", ".join(SECTIONS))
    relay_t = root.table("relay")
    set_files = _data_files(relay_t, "address_sets", base)
    profile_files = _data_files(relay_t, "profiles", base)

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

    relay = read_relay(relay_t)
    relay_t.finish()
    metrics = read_metrics(root.table("metrics"))
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
        accounts=tuple(accounts), profiles=tuple(profiles.values()), address_sets=sets)
    _check_header_rules(ctx, config)
    return config


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
    for candidate in (base / f"{key}.toml", shipped_conf_dir() / f"{key}.toml"):
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
