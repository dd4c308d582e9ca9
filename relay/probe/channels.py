"""Who ``relay check`` logs in as: every channel of an upstream, or the one asked for.

A channel is one identity toward the provider: the upstream's own credentials, each
[[account]] mapped to it (a relay user or an envelope sender; its mailbox and password
or token source, falling back to the upstream's), or, for a pass-through upstream, the
user and password the platform itself will log in with (``--user U --password-stdin``).
Each is walked on its own, so a wrong password on a second channel is not hidden behind
the first one's "ok".
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.config.schema import AccountConfig, Config, Secret, UpstreamConfig
from relay.errors import RelayError
from relay.probe.mailbox import Login


@dataclass(frozen=True, slots=True)
class Channel:
    upstream: UpstreamConfig
    login: Login
    identity: str                    # for people: whose credentials these are


def _account_name(a: AccountConfig) -> str:
    return f"user {a.user}" if a.user is not None else f"sender {a.sender}"


def _account_login(up: UpstreamConfig, a: AccountConfig) -> Login:
    where = f"the [[account]] for {_account_name(a)}"
    username = a.username or up.username
    if up.auth == "xoauth2":
        source = a.token_source or up.token_source
        if source:
            return Login("xoauth2", username, token_source=source, note=where)
        return Login("none", note=f"{where} has no token_source (nor has the upstream)")
    password = a.password or up.password
    if password is not None:
        return Login("password", username, password, note=where)
    return Login("none", note=f"{where} has no password (nor has the upstream)")


def channels_of(config: Config, up: UpstreamConfig, *, account: str | None = None,
                user: str | None = None, password: Secret | None = None) -> list[Channel]:
    """The channels to walk for one upstream (``account``: only the matching one)."""
    if user is not None:
        if up.auth not in ("passthrough", "password"):
            raise RelayError(f"upstream {up.name} logs in with auth = \"{up.auth}\": there is "
                             "no password login to test with --user",
                             hint="--user and --password-stdin test pass-through and password "
                                  "upstreams; leave them out to test this one's own login")
        return [Channel(up, Login("password", user, password, note="given with --user"),
                        f"--user {user}")]
    accounts = [a for a in config.accounts if a.upstream == up.name]
    if account is not None:
        chosen = [a for a in accounts if account in (a.user, a.sender, a.username)]
        return [Channel(up, _account_login(up, a), f"[[account]] for {_account_name(a)}")
                for a in chosen]
    if up.protocol == "outbox":
        return [Channel(up, Login("none"), "")]
    if up.auth in ("none", "passthrough"):
        note = ("auth = passthrough: the platform's own credentials are used; test them with "
                "--user NAME --password-stdin" if up.auth == "passthrough" else "auth = none")
        return [Channel(up, Login("passthrough" if up.auth == "passthrough" else "none",
                                  note=note), "")]
    out: list[Channel] = []
    if up.username and (up.password is not None or up.token_source):
        own = (Login("xoauth2", up.username, token_source=up.token_source)
               if up.token_source else Login("password", up.username, up.password))
        out.append(Channel(up, own, "its own credentials"))
    out += [Channel(up, _account_login(up, a), f"[[account]] for {_account_name(a)}")
            for a in accounts]
    return out or [Channel(up, Login("none", note=f"auth = {up.auth} but no credentials are "
                                                  "configured to test"), "")]


def plan(config: Config, names: list[str], *, account: str | None = None,
         user: str | None = None, password: Secret | None = None) -> list[Channel]:
    """Every channel to walk, in config order; RelayError naming what does not exist."""
    known = {u.name: u for u in config.upstreams}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RelayError(f"no upstream named {', '.join(unknown)}",
                         hint=f"configured upstreams: {', '.join(known) or 'none'}")
    selected = [known[n] for n in names] if names else list(config.upstreams)
    if user is not None and not names:
        selected = [u for u in selected if u.auth == "passthrough"]
        if len(selected) != 1:
            raise RelayError("--user needs the upstream to test: name it",
                             hint="e.g. relay check gmail-imap --user agent@example.com "
                                  "--password-stdin")
    out = [c for up in selected
           for c in channels_of(config, up, account=account, user=user, password=password)]
    if account is not None and not out:
        mapped = sorted({_account_name(a) for a in config.accounts
                         if a.upstream in {u.name for u in selected}})
        raise RelayError(f"no [[account]] matches {account!r}",
                         hint="--account names an account's user, sender or mailbox; these "
                              "exist: " + (", ".join(mapped) or "none"))
    return out
