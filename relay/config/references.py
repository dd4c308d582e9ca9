"""Check what ties sections together: unique names, and every reference by name resolves.

Runs after every section has been read on its own; may refine entries whose meaning
depends on others (an upstream's auth inferred from the accounts that use it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Literal

from relay.config.reader import Context, KeyPath, Table, show, suggest
from relay.config.schema import (
    AccountConfig,
    HostPort,
    ListenerConfig,
    ProfileConfig,
    UpstreamConfig,
)
from relay.errors import ConfigError


class Refs:
    """Named entries of one config, with the tables they came from (for errors)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def unique(self, section: str, names: Sequence[str], what: str = "name") -> None:
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                first = self.ctx.line((section, seen[name])) or 0
                raise self.ctx.error((section, i, what), f"duplicate {section} {what}",
                                     got=show(name), expected="a name used once",
                                     hint=f"{section}[{seen[name]}] (line {first}) already "
                                          f"uses it")
            seen[name] = i

    def resolve(self, path: KeyPath, name: str | None, kind: str,
                names: Iterable[str], *, allowed: str = "") -> None:
        """``name`` must be one of ``names`` (the [[kind]] entries)."""
        if name is None:
            return
        names = list(names)
        if name not in names:
            hint = suggest(name, names) or (
                f"defined {kind}s: {', '.join(names)}" if names else f"no [[{kind}]] is defined")
            raise self.ctx.error(path, f"unknown {kind}", got=show(name),
                                 expected=allowed or f"the name of a [[{kind}]]", hint=hint)


def check(ctx: Context, *, relay_default: str | None, listeners: Sequence[ListenerConfig],
          upstreams: list[UpstreamConfig], upstream_tables: Sequence[Table],
          route_upstreams: Sequence[str], proxies: Sequence[str], token_sources: Sequence[str],
          token_source_vias: Sequence[str | None], accounts: Sequence[AccountConfig],
          profiles: Sequence[ProfileConfig], metrics_listen: HostPort | None) -> None:
    """Raise ConfigError for the first broken reference; fixes up ``upstreams`` in place."""
    r = Refs(ctx)
    r.unique("listener", [x.name for x in listeners])
    r.unique("upstream", [u.name for u in upstreams])
    r.unique("proxy", proxies)
    r.unique("token_source", token_sources)
    _unique_listen(ctx, listeners, metrics_listen)
    by_name = {u.name: u for u in upstreams}
    profile_names = [p.name for p in profiles]
    deliverers = [u.name for u in upstreams if u.protocol in ("smtp", "outbox")]
    r.resolve(("relay", "default_upstream"), relay_default, "upstream", by_name)
    if relay_default is not None and relay_default not in deliverers:
        raise ctx.error(("relay", "default_upstream"), "not an smtp or outbox upstream",
                        got=show(relay_default), expected=f"one of {', '.join(deliverers)}")
    for i, name in enumerate(route_upstreams):
        r.resolve(("route", i, "upstream"), name, "upstream", by_name)
        if name not in deliverers:
            raise ctx.error(("route", i, "upstream"), "routes deliver to smtp or outbox "
                            f"upstreams, not {by_name[name].protocol}", got=show(name),
                            expected=f"one of {', '.join(deliverers)}")
    for i, via in enumerate(token_source_vias):
        r.resolve(("token_source", i, "via"), via, "proxy", proxies)
    for i, u in enumerate(upstreams):
        r.resolve(("upstream", i, "via"), u.via, "proxy", proxies)
        r.resolve(("upstream", i, "token_source"), u.token_source, "token_source", token_sources)
        r.resolve(("upstream", i, "profile"), u.profile, "profile", profile_names)
    for i, a in enumerate(accounts):
        r.resolve(("account", i, "upstream"), a.upstream, "upstream", by_name)
        r.resolve(("account", i, "token_source"), a.token_source, "token_source", token_sources)
    _upstream_auth(ctx, upstreams, upstream_tables, accounts)
    by_name = {u.name: u for u in upstreams}
    for i, x in enumerate(listeners):
        r.resolve(("listener", i, "profile"), x.profile, "profile", profile_names)
        if x.protocol == "smtp":
            continue
        r.resolve(("listener", i, "upstream"), x.upstream, "upstream", by_name)
        assert x.upstream is not None
        up = by_name[x.upstream]
        if up.protocol != x.protocol:
            raise ctx.error(("listener", i, "upstream"), "upstream protocol does not match "
                            f"the {x.protocol} listener", got=f'"{up.name}" ({up.protocol})',
                            expected=f'an [[upstream]] with protocol = "{x.protocol}"')
        if up.auth != "passthrough" and x.users_file is None:
            raise ctx.error(("listener", i, "users_file"), "missing users file",
                            expected="a file path",
                            hint=f'upstream "{up.name}" logs in with relay\'s own credentials '
                                 '(auth = "' + up.auth + '"), so relay must check the '
                                 "client's login itself; or set auth = \"passthrough\" on "
                                 "the upstream")
    _profile_sizes(ctx, listeners, upstreams, {p.name: p for p in profiles})
    smtp = any(x.protocol == "smtp" for x in listeners)
    if smtp and relay_default is None and not route_upstreams:
        raise ctx.error(("relay",), "nowhere to deliver", expected="relay.default_upstream "
                        "or at least one [[route]]",
                        hint="name the upstream that receives mail no route matches: "
                             'default_upstream = "NAME" under [relay]')


def _mb(n: int) -> str:
    return f"{n // 1048576} MB" if n % 1048576 == 0 else f"{n:,} bytes"


def _profile_sizes(ctx: Context, listeners: Sequence[ListenerConfig],
                   upstreams: Sequence[UpstreamConfig],
                   profiles: dict[str, ProfileConfig]) -> None:
    """Warn where a profile allows bigger messages than the listener in front of it."""
    smtp = [(i, x) for i, x in enumerate(listeners) if x.protocol == "smtp"]
    for i, x in smtp:
        p = profiles.get(x.profile or "")
        if p is not None and p.max_message_bytes and p.max_message_bytes > x.max_message_size:
            ctx.warn(("listener", i, "profile"),
                     f'profile "{p.name}" allows {_mb(p.max_message_bytes)} per message, but '
                     f"listener {x.name} takes at most {_mb(x.max_message_size)} "
                     f"(max_message_size): larger messages are refused with 552 5.3.4; raise "
                     f"max_message_size if the platform sends them")
    largest = max((x.max_message_size for _, x in smtp), default=0)
    for i, u in enumerate(upstreams):
        p = profiles.get(u.profile or "")
        if smtp and p is not None and p.max_message_bytes and p.max_message_bytes > largest:
            ctx.warn(("upstream", i, "profile"),
                     f'profile "{p.name}" allows {_mb(p.max_message_bytes)} per message, but '
                     f"no SMTP listener takes more than {_mb(largest)} (max_message_size)")


def _unique_listen(ctx: Context, listeners: Sequence[ListenerConfig],
                   metrics: HostPort | None) -> None:
    seen: dict[tuple[str, int], str] = {}
    if metrics is not None:
        seen[(metrics.host, metrics.port)] = "metrics.listen"
    for i, x in enumerate(listeners):
        k = (x.listen.host, x.listen.port)
        if k in seen:
            raise ctx.error(("listener", i, "listen"), "address already used",
                            got=show(str(x.listen)), expected="a free host:port",
                            hint=f"{seen[k]} listens there too")
        seen[k] = f'listener "{x.name}"'


def _upstream_auth(ctx: Context, upstreams: list[UpstreamConfig], tables: Sequence[Table],
                   accounts: Sequence[AccountConfig]) -> None:
    """Accounts give per-user credentials: infer an upstream's auth from them, and check."""
    for i, u in enumerate(upstreams):
        mine = [a for a in accounts if a.upstream == u.name]
        if u.protocol == "outbox":
            if mine:
                a = mine[0]
                raise _account_error(ctx, accounts.index(a), "upstream",
                                     "outbox upstreams take no accounts", u)
            continue
        explicit = "auth" in tables[i].raw
        auth: Literal["none", "password", "xoauth2", "passthrough"] = u.auth
        if mine and u.auth == "none" and not explicit:
            kinds = {"xoauth2" if a.token_source else "password" for a in mine
                     if a.token_source or a.password}
            if len(kinds) > 1:
                raise _account_error(ctx, accounts.index(mine[0]), "token_source",
                                     "accounts of one upstream mix passwords and tokens", u)
            auth = "xoauth2" if kinds == {"xoauth2"} else "password"
        for a in mine:
            j = accounts.index(a)
            if auth in ("none", "passthrough"):
                raise _account_error(ctx, j, "upstream", f'upstream "{u.name}" has auth = '
                                     f'"{auth}", so accounts for it are never used', u)
            if auth == "password" and (a.password is None):
                raise _account_error(ctx, j, "password_env", "missing password", u)
            if auth == "xoauth2" and a.password is not None:
                raise _account_error(ctx, j, "password_env", f'upstream "{u.name}" uses '
                                     "xoauth2; an account password is never sent", u)
            if auth == "xoauth2" and a.token_source is None and u.token_source is None:
                raise _account_error(ctx, j, "token_source", "missing token_source", u)
        if auth == "password" and u.password is None and not mine:
            raise ctx.error(("upstream", i, "password_env"), 'auth = "password" without '
                            "credentials", expected="username with password_env or "
                            "password_file, or [[account]] entries for this upstream")
        if auth == "xoauth2" and not mine and (u.token_source is None or not u.username):
            key = "token_source" if u.token_source is None else "username"
            raise ctx.error(("upstream", i, key), f"xoauth2 needs a {key}",
                            expected="a token_source and the mailbox as username, or "
                                     "[[account]] entries for this upstream")
        if auth != u.auth:
            upstreams[i] = dataclasses.replace(u, auth=auth)


def _account_error(ctx: Context, j: int, key: str, message: str,
                   u: UpstreamConfig) -> ConfigError:
    return ctx.error(("account", j, key), message,
                     hint=f'upstream "{u.name}" (line {u.line}) authenticates with '
                          f'auth = "{u.auth}"')
