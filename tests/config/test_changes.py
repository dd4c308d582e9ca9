"""Which upstreams a reload changed in a way that matters to their connections (pure)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from relay.config.changes import changed_upstreams
from relay.config.schema import (
    AccountConfig,
    Config,
    MetricsConfig,
    ProxyConfig,
    RelaySection,
    Secret,
    TokenSourceConfig,
    UpstreamConfig,
)

pytestmark = pytest.mark.fast

O365 = UpstreamConfig(name="o365", protocol="smtp", host="smtp.office365.com", port=587,
                      auth="xoauth2", username="cc@example.com", token_source="tok", via="dante")
GMAIL = UpstreamConfig(name="gmail", protocol="smtp", host="smtp.gmail.com", port=465,
                       tls="implicit", auth="password", username="a@example.org",
                       password=Secret("pw1"))
BASE = Config(source=Path("relay.toml"), relay=RelaySection(), metrics=MetricsConfig(),
              listeners=(), upstreams=(O365, GMAIL),
              proxies=(ProxyConfig(name="dante", kind="socks5", host="proxy", port=1080),),
              token_sources=(TokenSourceConfig(name="tok", kind="static",
                                               token_file=Path("/t")),),
              accounts=(AccountConfig(upstream="gmail", sender="s@example.org",
                                      username="s@example.org", password=Secret("pw2")),))


def ups(**o365: object) -> tuple[UpstreamConfig, ...]:
    return (replace(O365, **o365), GMAIL)


@pytest.mark.parametrize(("new", "changed"), [
    (replace(BASE, upstreams=ups(host="smtp-hve.office365.com")), ["o365"]),
    (replace(BASE, upstreams=ups(port=25)), ["o365"]),
    (replace(BASE, upstreams=ups(tls="implicit")), ["o365"]),
    (replace(BASE, upstreams=ups(via=None)), ["o365"]),
    (replace(BASE, upstreams=ups(username="other@example.com")), ["o365"]),
    (replace(BASE, proxies=(ProxyConfig(name="dante", kind="socks5", host="proxy2",
                                        port=1080),)), ["o365"]),       # the [[proxy]] entry
    (replace(BASE, token_sources=(TokenSourceConfig(name="tok", kind="static",
                                                    token_file=Path("/t2")),)), ["o365"]),
    (replace(BASE, accounts=(replace(BASE.accounts[0], password=Secret("new")),)),
     ["gmail"]),                                                         # an account's password
    (replace(BASE, upstreams=(O365, replace(GMAIL, password=Secret("pw9")))), ["gmail"]),
    # not a change of the way to the provider
    (replace(BASE, upstreams=ups(max_connections=8, profile="exchange-online", line=42)), []),
    (replace(BASE, proxies=(replace(BASE.proxies[0], line=7),)), []),
    (replace(BASE, upstreams=(O365,)), []),                              # removed: nothing due
])
def test_changed_upstreams(new: Config, changed: list[str]) -> None:
    assert changed_upstreams(BASE, new) == changed
