"""Everything derived from one Config, built and validated before it is put to use.

``build(config, ...)`` loads DKIM keys, users files and TLS certificates and builds the
router, deliverer, checks and accept pipelines. Any mistake raises before anything
running is touched, so a reload either swaps in a whole new set or keeps the old one.
The listener part lives in ``relay.app.listeners`` (SMTP listener processes build only it).
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay.app.listeners import ListenerParts, ListenerSide, build_listeners
from relay.config.schema import Config
from relay.dns import Resolver
from relay.metrics import Metrics
from relay.oauth.tokens import TokenSources
from relay.outbound.attempt import Deliverer
from relay.proxy.accounts import build_authenticator, users_file_verify
from relay.routing import Router
from relay.spool.handovers import Handovers
from relay.spool.store import Spool
from relay.transports.factory import Transports

if TYPE_CHECKING:
    from relay.dkim.sign import Signer

__all__ = ["Components", "ListenerParts", "ListenerSide", "build", "build_listeners"]


@dataclass
class Components:
    config: Config
    router: Router
    deliverer: Deliverer
    signer: Signer | None
    resolver: Resolver
    listeners: dict[str, ListenerParts] = field(default_factory=dict)


def build(config: Config, *, spool: Spool, transports: Transports, tokens: TokenSources,
          metrics: Metrics, dns_pool: Executor | None = None,
          handovers: Handovers | None = None) -> Components:
    """Validate and build everything a config implies; raises ConfigError on a mistake.
    ``handovers`` is the process's journal: it outlives every config (the runtime's)."""
    side = build_listeners(config, spool=spool, metrics=metrics, dns_pool=dns_pool)
    for parts in side.listeners.values():
        lc = parts.cfg
        if lc.protocol != "smtp":
            assert lc.upstream is not None
            verify = users_file_verify(parts.users) if parts.users is not None else None
            parts.authenticator = build_authenticator(config.upstream(lc.upstream),
                                                      config.accounts, verify)
    deliverer = Deliverer.from_config(config, transport_for=transports.for_upstream,
                                      token_for=tokens.token, metrics=metrics,
                                      handovers=handovers)
    return Components(config=config, router=side.router, deliverer=deliverer,
                      signer=side.signer, resolver=side.resolver, listeners=side.listeners)
