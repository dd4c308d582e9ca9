"""Proxy listeners default to a platform's one-session-per-mailbox from one address."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from relay.config.loader import load_config
from relay.config.schema import (
    PROXY_MAX_CONNECTIONS,
    PROXY_MAX_CONNECTIONS_PER_CLIENT,
    Config,
)
from relay.connlimits import descriptors_for
from tests.config.conftest import BASE

pytestmark = pytest.mark.fast

IMAP = '''
[[listener]]
name = "imap"
protocol = "imap"
listen = "127.0.0.1:1143"
allow_plaintext_auth = true
upstream = "provider"
{limits}
[[upstream]]
name = "provider"
protocol = "imap"
host = "imap.example.com"
tls = "implicit"
auth = "passthrough"
'''


def load(tmp_path: Path, limits: str = "") -> Config:
    path = tmp_path / "relay.toml"
    path.write_text(BASE + IMAP.format(limits=limits))
    return load_config(path)


def test_proxy_defaults_allow_a_thousand_mailboxes_from_one_host(tmp_path: Path) -> None:
    smtp, imap = load(tmp_path).listeners
    assert (imap.max_connections, imap.max_connections_per_client) == (
        PROXY_MAX_CONNECTIONS, PROXY_MAX_CONNECTIONS_PER_CLIENT)
    assert imap.max_connections_per_client >= 9_900          # up to the descriptor limit
    assert (smtp.max_connections, smtp.max_connections_per_client) == (200, 20)


def test_explicit_proxy_limits_win(tmp_path: Path) -> None:
    _, imap = load(tmp_path, "max_connections = 300\nmax_connections_per_client = 7\n").listeners
    assert (imap.max_connections, imap.max_connections_per_client) == (300, 7)


def test_descriptor_limit_raised_toward_the_need() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        low = min(soft, 256)
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        want = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
        assert descriptors_for(want) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
        assert descriptors_for(10) == want                     # never lowered
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
