"""Which sessions a reload that changed the way to the upstream touches, and how (unit)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay.config.schema import (
    Config,
    HostPort,
    ListenerConfig,
    MetricsConfig,
    ProxyConfig,
    RelaySection,
    Secret,
    UpstreamConfig,
)
from relay.proxy.accounts import PassthroughAuthenticator
from relay.proxy.pump import Channel
from relay.proxy.session import ProxySession, SessionContext
from relay.proxy.upstream_path import upstream_path
from relay.throttle import FailureThrottle
from relay.transports.direct import DirectTransport

pytestmark = pytest.mark.fast

UP = UpstreamConfig(name="mbx", protocol="imap", host="imap.example.com", port=993,
                    tls="implicit", auth="passthrough", via="a", line=30)
LISTENER = ListenerConfig(name="imap", protocol="imap", listen=HostPort("127.0.0.1", 1143),
                          upstream="mbx", allow_plaintext_auth=True)


def config(via: str, *, line: int = 30, password: str = "pw") -> Config:
    proxies = tuple(ProxyConfig(name=n, kind="socks5", host=f"{n}.example.com", port=1080,
                                username="relay", password=Secret(password), line=10)
                    for n in ("a", "b"))
    return Config(source=Path("relay.toml"), relay=RelaySection(),
                  metrics=MetricsConfig(), listeners=(LISTENER,),
                  upstreams=(dataclasses.replace(UP, via=via, line=line),), proxies=proxies)


def context(cfg: Config, policy: str = "reconnect") -> SessionContext:
    return SessionContext(
        listener=dataclasses.replace(LISTENER, on_upstream_change=policy),  # type: ignore[arg-type]
        upstream=cfg.upstream("mbx"), authenticator=PassthroughAuthenticator(),
        transport_for=lambda _u: DirectTransport(), token_for=None, metrics=None,
        failures=FailureThrottle(limit=5, window=60), path=upstream_path(cfg, "mbx"))


def test_what_counts_as_another_way() -> None:
    old = upstream_path(config("a"), "mbx")
    assert upstream_path(config("a", line=99), "mbx") == old     # moved in the file: same
    assert old.changes(upstream_path(config("b"), "mbx")) == "proxy a → b"
    assert old.changes(upstream_path(config("a", password="new"), "mbx")) == \
        "the settings of proxy a"


async def test_a_reload_during_login_ends_the_session_once_spliced() -> None:
    old, new = context(config("a")), context(config("b"))
    session = ProxySession(old, Channel(), ("127.0.0.1", 50000))
    session.ctx = new                  # the listener swaps it: not spliced yet
    session._logged_in_through(old)    # ... but the login it ran went the old way
    assert session.ctx is old and session.reconnecting == "proxy a → b"
    session = ProxySession(old, Channel(), ("127.0.0.1", 50001))
    session.ctx = context(config("b"), "keep")
    session._logged_in_through(old)
    assert session.reconnecting == ""  # "keep": it stays on the old way
    session = ProxySession(old, Channel(), ("127.0.0.1", 50002))
    session._logged_in_through(old)    # no reload meanwhile
    assert session.reconnecting == ""
