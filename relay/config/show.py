"""Render a loaded ``Config`` as TOML: every effective value, defaults filled, secrets masked.

Secrets are shown by where they come from (``password_env = "VAR"``), never by value.
Sizes are bytes, durations seconds, named address sets already expanded into ``allow``.
Every address set and profile in effect is written out, and ``[relay] address_sets`` and
``profiles`` are empty, so the output is a whole config: ``relay config check`` passes it
as it passed the original, with no warning about entries replacing shipped ones.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from pathlib import Path

from relay.config.listener import PROXY_ONLY, SMTP_ONLY
from relay.config.schema import (
    Config,
    HostPort,
    ListenerConfig,
    ProxyConfig,
    Secret,
    UpstreamConfig,
)
from relay.config.sections import SMTP_UPSTREAM_ONLY

# Config field → (TOML section name, array of tables?)
_SECTIONS = (("relay", "relay", False), ("metrics", "metrics", False),
             ("listeners", "listener", True), ("upstreams", "upstream", True),
             ("routes", "route", True), ("proxies", "proxy", True), ("dkim", "dkim", True),
             ("token_sources", "token_source", True), ("accounts", "account", True),
             ("profiles", "profile", True), ("pacing", "pacing", False),
             ("throttle_replies", "throttle_reply", True))
_SKIP = frozenset({"line"})
_OUTBOX = frozenset({"name", "protocol", "path", "max_connections", "profile", "header_rules",
                     "quotas", "connections_per_mailbox", "mailbox"})
_KEYS = {"codes": "code"}          # field name -> the key the loader reads


def _not_applicable(obj: object) -> frozenset[str]:
    """Fields the loader refuses for this entry's protocol (so they are not shown)."""
    def fields(keys: tuple[str, ...]) -> frozenset[str]:
        plural = {"header_rule": "header_rules", "quota": "quotas"}
        return frozenset(plural.get(k, k) for k in keys)
    if isinstance(obj, ListenerConfig):
        return fields(PROXY_ONLY if obj.protocol == "smtp" else SMTP_ONLY)
    if isinstance(obj, UpstreamConfig) and obj.protocol in ("imap", "pop3"):
        return fields(SMTP_UPSTREAM_ONLY)
    if isinstance(obj, ProxyConfig) and obj.kind == "ssh":
        return frozenset({"remote_dns"})
    if isinstance(obj, UpstreamConfig) and obj.protocol == "outbox":
        return frozenset(f.name for f in dataclasses.fields(obj)) - _OUTBOX
    return frozenset()


def render(config: Config) -> str:
    out = [f"# effective config loaded from {config.source}", ""]
    for attr, section, many in _SECTIONS:
        value = getattr(config, attr)
        for item in value if many else (value,):
            extra = _SELF_CONTAINED if section == "relay" else ()
            out.extend(_table(section, item, many, extra))
    for name, nets in config.address_sets.items():
        out.append("[[address_set]]")
        out.append(f"name = {_scalar(name)}")
        out.append(f"networks = {_scalar([str(n) for n in nets])}")
        out.append("")
    return "\n".join(out)


_SELF_CONTAINED = ("address_sets = []                      # every set in effect is below",
                   "profiles = []                          # every profile in effect is below",
                   "throttle_replies = []                  # every throttle reply is below")


def _table(header: str, obj: object, many: bool, extra: tuple[str, ...] = ()) -> list[str]:
    out = [f"[[{header}]]" if many else f"[{header}]"]
    if isinstance(obj, ProxyConfig):           # shown the way it is written: a url
        user = f"{obj.username}@" if obj.username else ""
        host = f"[{obj.host}]" if ":" in obj.host else obj.host
        out.append(f'url = "{obj.kind}://{user}{host}:{obj.port}"')
    later: list[str] = []
    skip = _SKIP | _not_applicable(obj)
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        if f.name in skip or (header == "proxy" and f.name in ("kind", "host", "port",
                                                                 "username")):
            continue
        value = getattr(obj, f.name)
        if value is None or value == "":               # unset
            continue
        if isinstance(value, Secret):
            out.append(_secret(f.name, value))
        elif f.name == "header_rules":
            for rule in value:
                later.append(f"[[{header}.header_rule]]")
                later.extend(f"{k} = {_scalar(getattr(rule, k))}" for k in
                             ("action", "header", "value") if getattr(rule, k) != "")
        elif f.name == "quotas":
            for quota in value:
                later.append(f"[[{header}.quota]]")
                later.extend(f"{g.name} = {_scalar(getattr(quota, g.name))}"
                             for g in dataclasses.fields(quota)
                             if g.name != "line" and getattr(quota, g.name) is not None)
        elif dataclasses.is_dataclass(value) and not isinstance(value, HostPort):
            later.append(f"[{header}.{f.name}]")
            later.extend(f"{g.name} = {_scalar(getattr(value, g.name))}"
                         for g in dataclasses.fields(value))
        else:
            out.append(f"{_KEYS.get(f.name, f.name)} = {_scalar(value)}")
    return [*out, *extra, *later, ""]


def _secret(name: str, secret: Secret) -> str:
    kind, _, where = secret.origin.partition(" ")
    if kind in ("env", "file") and where:
        return f"{name}_{kind} = {_scalar(where)}"
    return f'# {name}: set (hidden)'


def _scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, Path | HostPort | ipaddress.IPv4Network | ipaddress.IPv6Network):
        value = str(value)
    return json.dumps(str(value), ensure_ascii=False)
