"""What the SMTP listeners of a Config need: users files, accept pipelines, checks.

Built on its own by an SMTP listener process (``smtp_only``), which so never imports the
delivery, transport or proxy code; the main process's ``relay.app.components.build`` adds
the deliverer and the IMAP/POP3 authenticators. Any mistake raises ConfigError before
anything running is touched.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relay.checks.ownership import Ownership
from relay.config.schema import Config, ListenerConfig, ProfileConfig
from relay.dns import Resolver
from relay.errors import ConfigError
from relay.headers import HeaderGuard, protected_patterns
from relay.metrics import Metrics
from relay.routing import Router
from relay.smtp.accept import AcceptPipeline, RoutedChecks
from relay.spool.store import Spool
from relay.users import UserDB

if TYPE_CHECKING:
    from relay.checks.spf import SpfChecker
    from relay.dkim.sign import Signer
    from relay.proxy.accounts import Authenticator

log = logging.getLogger("relay.app")


@dataclass
class ListenerParts:
    """What one listener needs from a config (SMTP or IMAP/POP3)."""

    cfg: ListenerConfig
    users: UserDB | None = None
    accept: AcceptPipeline | None = None             # smtp
    checks: RoutedChecks | None = None               # smtp
    authenticator: Authenticator | None = None       # imap/pop3


def _users(cfg: ListenerConfig, cache: dict[Path, UserDB]) -> UserDB | None:
    if cfg.users_file is None:
        return None
    db = cache.get(cfg.users_file)
    if db is None:
        try:
            db = UserDB.load(cfg.users_file)
        except ConfigError as exc:
            raise ConfigError(exc.detail, file=exc.file or str(cfg.users_file),
                              line=exc.line, key=f"listener {cfg.name!r}.users_file",
                              hint=exc.hint or "create it with: relay user add NAME") from None
        cache[cfg.users_file] = db
    return db


def _warn_owners(lc: ListenerConfig, ownership: Ownership) -> None:
    if lc.sender_ownership != "enforce":
        return
    for name in ownership.users_without_addresses():
        log.warning("listener %s: user %s owns no address, so every message it sends will "
                    "be refused (553 5.7.1): list what it may send as with `relay user add "
                    "%s --owns ADDRESS,DOMAIN` or [[account]] owns, or set "
                    "sender_ownership = \"log\" on the listener", lc.name, name, name)


@dataclass
class ListenerSide:
    """What the SMTP listeners of a config need (a listener process builds only this)."""

    router: Router
    signer: Signer | None
    resolver: Resolver
    listeners: dict[str, ListenerParts] = field(default_factory=dict)


def _signer(config: Config, metrics: Metrics) -> Signer | None:
    """The DKIM signer, if any [[dkim]] key is configured. Its modules (cryptography's
    keys and hashes) are imported only then: a listener process is one of several."""
    if not config.dkim:
        return None
    from relay.dkim.keys import load_keys
    from relay.dkim.sign import Signer

    return Signer(load_keys(config.dkim), metrics=metrics,
                  on_failure={d.domain: d.on_failure for d in config.dkim})


def _spf_checker(config: Config, resolver: Resolver, metrics: Metrics) -> SpfChecker | None:
    """The SPF checker, if an SMTP listener checks SPF: pyspf and dnspython (about 6 MB
    of memory per process) are loaded only then."""
    if not any(lc.protocol == "smtp" and lc.spf != "off" for lc in config.listeners):
        return None
    from relay.checks.spf import SpfChecker

    return SpfChecker(resolver=resolver, hostname=config.relay.hostname, metrics=metrics)


def build_listeners(config: Config, *, spool: Spool, metrics: Metrics,
                    smtp_only: bool = False, dns_pool: Executor | None = None) -> ListenerSide:
    """DKIM keys, users, accept pipelines and checks per listener; ConfigError on a mistake.

    ``dns_pool``: the process's DNS threads (``relay.dns.lookup_pool``), kept across reloads.
    """
    signer = _signer(config, metrics)
    router = Router(config.routes, config.relay.default_upstream)
    resolver = Resolver.from_config(config.relay, executor=dns_pool)
    guard = HeaderGuard(protected_patterns(config.relay), metrics=metrics)
    profiles: dict[str, ProfileConfig] = {p.name: p for p in config.profiles}
    upstream_profiles = {u.name: profiles[u.profile] for u in config.upstreams
                         if u.profile is not None}
    spf = _spf_checker(config, resolver, metrics)
    side = ListenerSide(router=router, signer=signer, resolver=resolver)
    users_cache: dict[Path, UserDB] = {}
    for lc in config.listeners:
        if smtp_only and lc.protocol != "smtp":
            continue
        users = _users(lc, users_cache)
        if lc.protocol == "smtp":
            ownership = None
            if users is not None:
                ownership = Ownership(users=users, accounts=config.accounts,
                                      mode=lc.sender_ownership, listener=lc.name)
                if not smtp_only:          # the main process says it once per load
                    _warn_owners(lc, ownership)
            side.listeners[lc.name] = ListenerParts(
                cfg=lc, users=users,
                accept=AcceptPipeline(listener=lc, config=config, spool=spool, router=router,
                                      signer=signer, guard=guard),
                checks=RoutedChecks(router=router,
                                    profile=profiles[lc.profile] if lc.profile else None,
                                    upstream_profiles=upstream_profiles,
                                    spf=spf if lc.spf != "off" else None, spf_policy=lc.spf,
                                    space=spool.health,
                                    spf_permerror=lc.spf_permerror,
                                    structure_checks=lc.structure_checks,
                                    max_header_size=lc.max_header_size,
                                    ownership=ownership,
                                    add_missing_headers=lc.add_missing_headers,
                                    hostname=config.relay.hostname))
        else:
            # IMAP/POP3: the main process adds the authenticator (relay.app.components),
            # so this module, which a listener process runs, never loads the proxy.
            side.listeners[lc.name] = ListenerParts(cfg=lc, users=users)
    return side
