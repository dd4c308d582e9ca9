"""Build the local sections of the config: [relay], [metrics], [retry], header rules.

Each builder reads one table through ``reader.Table`` (which refuses unknown keys and
wrong types) and applies the rules that need only that table; references between
sections are checked afterwards by ``relay.config.references``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
from pathlib import Path
from typing import Any, Literal, cast

from relay.config.machine import auto_smtp_processes
from relay.config.reader import Table, show, suggest
from relay.config.schema import (
    EVENT_LOOPS,
    STRUCTURE_CHECKS,
    STRUCTURE_LEVELS,
    HeaderRule,
    HostPort,
    MetricsConfig,
    RelaySection,
    RetryConfig,
)
from relay.config.values import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    BadValue,
    is_address,
    is_domain,
    is_header_name,
    parse_duration,
    parse_hostport,
    parse_size,
)

TLS_MODES = ("none", "starttls", "implicit")
LOG_LEVELS = ("debug", "info", "warning", "error")


def smtp_processes(t: Table) -> int:
    """``smtp_processes``: an integer from 0 to 64, or "auto" (the default): one per CPU
    the relay may use, at most 8."""
    t.known.add("smtp_processes")
    value = t.raw.get("smtp_processes", "auto")
    if value == "auto":
        return auto_smtp_processes()
    expected = 'an integer from 0 to 64, or "auto"'
    hint = ('"auto" starts one SMTP listener process per CPU; 0 serves SMTP in the main '
            "process")
    if isinstance(value, bool) or not isinstance(value, int):
        raise t.error("smtp_processes", "unknown value" if isinstance(value, str)
                      else "wrong type", got=show(value), expected=expected, hint=hint)
    if not 0 <= value <= 64:
        raise t.error("smtp_processes", "out of range", got=str(value), expected=expected,
                      hint=hint)
    return value


def event_loop(t: Table) -> str:
    """``event_loop``: "uvloop" (the default) or "asyncio"; uvloop must be installed."""
    value = t.enum("event_loop", EVENT_LOOPS, default(RelaySection, "event_loop"),
                   hint='"uvloop" (the default) runs relay on libuv\'s event loop, "asyncio" '
                        'on the standard library\'s')
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise t.error("event_loop", "uvloop is not installed", got='"uvloop"',
                      hint='install it (pip install uvloop, in the environment relay runs '
                           'from), or set event_loop = "asyncio"')
    return value


def default(cls: type, name: str) -> Any:
    """The schema's default for one field (one source of truth for defaults)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
    raise KeyError(name)


def duration(t: Table, key: str, cls: type, *, min: float = 0.0,
             max: float | None = None) -> float:
    return t.bounded(key, parse_duration, default(cls, key), expected=DURATION_EXPECTED,
                     min=min, max=max)


def size(t: Table, key: str, dflt: int | None, *, min: int = 1) -> int | None:
    value = t.parsed(key, parse_size, dflt, expected=SIZE_EXPECTED)
    if value is not None and value < min:
        raise t.error(key, "out of range", got=show(t.raw[key]),
                      expected=f"{SIZE_EXPECTED}, at least {min} bytes")
    return value


def hostport(t: Table, key: str, dflt: HostPort | None, *, default_port: int | None = None,
             ip_only: bool = False) -> HostPort | None:
    def parse(v: object) -> HostPort:
        return parse_hostport(v, default_port=default_port, ip_only=ip_only)
    return t.parsed(key, parse, dflt, expected='"HOST:PORT" such as "127.0.0.1:2525"')


def priority(t: Table, dflt: int | None) -> int | None:
    """A line priority: within one mailbox's line, higher leaves first (default 0)."""
    return t.integer("priority", dflt, min=-100, max=100)


STRUCTURE_EXPECTED = ('"strict", "standard", "off" or a list of check names ('
                      + ", ".join(f'"{c}"' for c in STRUCTURE_CHECKS) + ")")


def structure_checks(t: Table, key: str, dflt: tuple[str, ...]) -> tuple[str, ...]:
    """A level name (``"strict"``) or a list of check names, as the checks to run."""
    value = t.raw.get(key)
    t.known.add(key)
    if value is None:
        return dflt
    if isinstance(value, str):
        return STRUCTURE_LEVELS[t.enum(key, tuple(STRUCTURE_LEVELS))]
    names = t.str_list(key, expected=STRUCTURE_EXPECTED)
    for i, name in enumerate(names):
        if name not in STRUCTURE_CHECKS:
            raise t.ctx.error((*t.path, key, i), "unknown structure check", got=show(name),
                              expected=STRUCTURE_EXPECTED,
                              hint=suggest(name, (*STRUCTURE_CHECKS, *STRUCTURE_LEVELS)))
    return tuple(c for c in STRUCTURE_CHECKS if c in names)


def read_relay(t: Table) -> RelaySection:
    D = RelaySection
    hostname = t.text("hostname", socket.gethostname() or "localhost",
                     expected="a host name such as \"relay.example.com\"", check=is_domain)
    spool = t.file("spool") or Path(default(D, "spool"))
    dns: list[HostPort] = []
    for i, item in enumerate(t.str_list("dns_servers", expected='an IP address such as '
                                        '"192.0.2.53" or "127.0.0.1:5353"')):
        try:
            dns.append(parse_hostport(item, default_port=53, ip_only=True))
        except BadValue as exc:
            raise t.ctx.error((*t.path, "dns_servers", i), exc.what, got=show(item),
                              expected=exc.expected, hint=exc.hint) from None
    bounce_from = t.text("bounce_from", expected='an address such as "postmaster@example.com"',
                        check=is_address)
    protected = t.str_list("protected_headers",
                           expected='header names such as "X-Custom" or "X-Vendor-*"',
                           check=lambda h: is_header_name(h.rstrip("*")))
    return RelaySection(
        hostname=hostname,
        spool=spool,
        pid_file=t.file("pid_file"),
        control_socket=t.file("control_socket"),
        log_level=t.enum("log_level", LOG_LEVELS, default(D, "log_level")),
        default_upstream=t.opt_text("default_upstream"),
        dns_servers=tuple(dns),
        dns_timeout=duration(t, "dns_timeout", D, min=0.001),
        slow_delivery_threshold=duration(t, "slow_delivery_threshold", D, min=0.001),
        protected_headers=protected,
        retry=read_retry(t.table("retry")),
        bounce_from=bounce_from,
        fsync=t.flag("fsync", default(D, "fsync")),
        shutdown_grace=duration(t, "shutdown_grace", D),
        smtp_processes=smtp_processes(t),
        event_loop=event_loop(t),
        account_fail_limit=t.integer("account_fail_limit", default(D, "account_fail_limit"),
                                     min=0) or 0,
        account_fail_window=duration(t, "account_fail_window", D, min=0.001),
        spool_reserve=size(t, "spool_reserve", default(D, "spool_reserve"), min=0) or 0,
    )


def read_retry(t: Table) -> RetryConfig:
    first = duration(t, "first", RetryConfig, min=0.001)
    most = duration(t, "max", RetryConfig, min=0.001)
    jitter = t.bounded("jitter", _fraction, default(RetryConfig, "jitter"),
                       expected="a fraction", min=0.0, max=0.9)
    lifetime = duration(t, "lifetime", RetryConfig, min=0.001)
    if most < first and "max" in t.raw:
        raise t.error("max", "retry.max is shorter than retry.first", got=show(t.raw["max"]),
                      expected=f"at least {first:g} seconds")
    if most < first:
        raise t.error("first", f"retry.first is longer than retry.max (not set: {most:g} "
                      "seconds by default)", got=show(t.raw["first"]),
                      expected=f"at most {most:g} seconds",
                      hint=f"lower retry.first, or set retry.max to at least {first:g} "
                           "seconds too")
    t.finish()
    return RetryConfig(first=first, max=most, jitter=jitter, lifetime=lifetime)


def _fraction(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not -1 <= v <= 1:
        raise BadValue("not a number" if not isinstance(v, int | float) or
                       isinstance(v, bool) else "out of range",
                       expected="a number from 0 to 0.9")
    return float(v)


def read_metrics(t: Table) -> MetricsConfig:
    listen = hostport(t, "listen", default(MetricsConfig, "listen"))
    assert listen is not None
    cfg = MetricsConfig(enabled=t.flag("enabled", default(MetricsConfig, "enabled")),
                        listen=listen)
    t.finish()
    return cfg


def read_header_rules(parent: Table) -> tuple[HeaderRule, ...]:
    rules: list[HeaderRule] = []
    for t in parent.tables("header_rule"):
        action = t.enum("action", ("add", "remove", "replace"))
        header = t.text("header", required=True, expected='a header name such as "X-Relay"',
                       check=is_header_name)
        value = t.opt_text("value", expected="a header value on one line",
                          check=lambda v: "\r" not in v and "\n" not in v)
        if action == "remove" and value is not None:
            raise t.error("value", "a remove rule takes no value",
                          hint="delete the value line, or use action = \"replace\"")
        if action != "remove" and value is None:
            raise t.error("value", "missing required key",
                          expected=f"the header value for the {action} rule")
        t.finish()
        rules.append(HeaderRule(action=cast(Literal["add", "remove", "replace"], action),
                                header=header, value=value or "",
                                line=t.ctx.line(t.path) or 0))
    return tuple(rules)


SMTP_UPSTREAM_ONLY = ("helo_name", "max_messages_per_connection", "data_timeout", "profile",
                      "header_rule", "quota", "connections_per_mailbox", "mailbox")
