"""Build the pacing entries: [pacing], [[upstream.quota]] and [[throttle_reply]].

Quotas (``messages``, ``recipients`` and ``bytes`` per ``window``, per mailbox or per
upstream) add to or override an upstream profile's rate limits; the throttle-reply
table (shipped in ``relay/data/throttle_replies.toml``, extended by a config's own
``[[throttle_reply]]`` entries) says which provider replies mean "slow down".
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Literal, cast

from relay.config.reader import Table, show
from relay.config.schema import PacingSection, QuotaConfig, ThrottleReplyConfig
from relay.config.sections import default, duration, size
from relay.config.values import is_name

ACTIONS = ("pause-mailbox", "pause-upstream")
_STATUS = re.compile(r"^[245](\.\d{1,3}){0,2}\.?$")


def read_pacing(t: Table) -> PacingSection:
    D = PacingSection
    backend = t.enum("backend", ("local", "redis"), default(D, "backend"))
    url = t.text("redis_url", expected='"redis://HOST:6379/0" or "rediss://HOST:6380/0"')
    password = t.secret("password")
    if url:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("redis", "rediss") or not parts.hostname:
            raise t.error("redis_url", "not a Redis URL", got=show(url),
                          expected='"redis://HOST:6379/0" or "rediss://HOST:6380/0"')
        if parts.password:
            raise t.error("redis_url", "password inside the url is not accepted",
                          expected="the url without it, with password_env or "
                                   "password_file",
                          hint="move the password to an environment variable or a file")
    if backend == "redis" and not url:
        raise t.error("redis_url", 'backend = "redis" needs the Redis server',
                      expected='"redis://HOST:6379/0"',
                      hint="every replica names the same Redis; see the README's "
                           "\"Several replicas\" section")
    if backend == "local" and url:
        t.warn("redis_url", 'ignored: backend = "local" keeps quotas in this process')
    ca_file = t.file("ca_file", exists=True, readable=True)
    if ca_file is not None and not url.startswith("rediss://"):
        raise t.error("ca_file", "a CA file without TLS to Redis", got=show(t.raw["ca_file"]),
                      expected='redis_url = "rediss://..." (TLS), or no ca_file')
    cfg = PacingSection(
        backend=cast(Literal["local", "redis"], backend),
        redis_url=url,
        password=password,
        replicas=t.integer("replicas", default(D, "replicas"), min=1, max=1000) or 1,
        key_prefix=t.text("key_prefix", default(D, "key_prefix"),
                          expected='a name such as "relay"', check=is_name),
        timeout=duration(t, "timeout", D, min=0.001, max=60.0),
        retry_interval=duration(t, "retry_interval", D, min=0.1),
        ca_file=ca_file,
    )
    t.finish()
    return cfg


def read_quotas(parent: Table) -> tuple[QuotaConfig, ...]:
    quotas: list[QuotaConfig] = []
    for t in parent.tables("quota"):
        window = t.parsed("window", _window, 0.0, expected='a duration such as "1m"',
                          required=True)
        scope = t.enum("scope", ("mailbox", "upstream"), "mailbox")
        cfg = QuotaConfig(
            window=window,
            scope=cast(Literal["mailbox", "upstream"], scope),
            messages=t.integer("messages", None, min=1),
            recipients=t.integer("recipients", None, min=1),
            bytes=size(t, "bytes", None),
            line=t.ctx.line(t.path) or 0,
        )
        if cfg.messages is None and cfg.recipients is None and cfg.bytes is None:
            raise t.error(None, "a quota without a limit",
                          expected="messages, recipients or bytes (one or more)",
                          hint='e.g. messages = 30 and window = "1m"')
        t.finish()
        quotas.append(cfg)
    return tuple(quotas)


def _window(value: object) -> float:
    from relay.config.values import BadValue, parse_duration

    seconds = parse_duration(value)
    if seconds <= 0:
        raise BadValue("a window of zero", expected='a duration such as "1m"')
    return seconds


def read_throttle_reply(t: Table) -> ThrottleReplyConfig:
    D = ThrottleReplyConfig
    name = t.text("name", required=True, expected='a name such as "exchange-submission-quota"',
                 check=is_name)
    action = t.enum("action", ACTIONS)
    codes = _codes(t)
    status = t.text("status", expected='an enhanced status code or its start, such as "4.7." '
                    'or "5.4.5"', check=lambda s: bool(_STATUS.match(s)))
    text = t.text("text", expected="a regular expression")
    if text:
        try:
            re.compile(text)
        except re.error as exc:
            raise t.error("text", "not a regular expression", got=show(text),
                          expected="a Python regular expression",
                          hint=f"{exc}; escape . ( ) [ ] with a backslash ('\\\\.' in TOML "
                               "basic strings, '\\.' in 'literal strings')") from None
    if not (codes or status or text):
        raise t.error(None, "a throttle reply that matches every reply",
                      expected="code, status or text (one or more)")
    pause = duration(t, "pause", D, min=0.001)
    max_pause = duration(t, "max_pause", D, min=0.001)
    if max_pause < pause:
        raise t.error("max_pause", "max_pause is shorter than pause",
                      got=show(t.raw.get("max_pause")), expected=f"at least {pause:g} seconds")
    cfg = ThrottleReplyConfig(
        name=name, action=cast(Literal["pause-mailbox", "pause-upstream"], action),
        codes=codes, status=status.rstrip("."), text=text, pause=pause, max_pause=max_pause,
        provider=t.text("provider"), line=t.ctx.line(t.path) or 0)
    t.text("description")
    t.finish()
    return cfg


def _codes(t: Table) -> tuple[int, ...]:
    expected = "a reply code such as 421, or an array of them"
    raw = t.raw.get("code")
    t.known.add("code")
    if raw is None:
        return ()
    codes: list[int] = []
    for item in raw if isinstance(raw, list) else [raw]:
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 599:
            raise t.error("code", "not a reply code", got=show(raw),
                          expected=expected + " (400 to 599)",
                          hint="a throttle reply is a 4xx or 5xx the provider sends instead "
                               "of accepting the message")
        codes.append(item)
    return tuple(codes)


def throttle_table(tables: list[Table], into: dict[str, ThrottleReplyConfig]) -> None:
    """Add each ``[[throttle_reply]]`` of one file to ``into``, in file order."""
    seen: set[str] = set()
    for t in tables:
        row = read_throttle_reply(t)
        if row.name in seen:
            raise t.error("name", "duplicate throttle reply name", got=show(row.name),
                          expected="a name used once per file")
        seen.add(row.name)
        into[row.name] = row


def merged(own: dict[str, ThrottleReplyConfig], shipped: dict[str, ThrottleReplyConfig]
           ) -> tuple[ThrottleReplyConfig, ...]:
    """The table as matched: the config's own rows first, then the data files' rows that
    no own row of the same name replaces."""
    return (*own.values(), *(r for name, r in shipped.items() if name not in own))
