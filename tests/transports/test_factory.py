"""The transport registry: handles follow a reload to the changed proxy."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest

from relay.config.schema import ProxyConfig, UpstreamConfig
from relay.errors import ConfigError, TransportError
from relay.transports.base import Transport
from relay.transports.direct import DirectTransport
from relay.transports.factory import Transports
from relay.transports.socks5 import Socks5Transport
from relay.transports.ssh import SshTransport
from tests.peers import free_port
from tests.peers.dante import Dante
from tests.transports.helpers import proxy_config
from tests.transports.test_socks5 import echo_through


def upstream(port: int, via: str | None) -> UpstreamConfig:
    return UpstreamConfig(name="u", protocol="smtp", host="127.0.0.1", port=port, via=via)


async def test_reload_moves_every_upstream_using_the_proxy(dante_proxy: Dante,
                                                           echo_port: int) -> None:
    good = proxy_config(dante_proxy, name="p")
    registry = Transports([good])
    handle: Transport = registry.for_upstream(upstream(echo_port, "p"))
    assert handle.name == "p"
    sock = await handle.connect("127.0.0.1", echo_port, timeout=5)
    assert await echo_through(sock, b"a") == b"a"

    dead_port = free_port()
    registry.reconfigure([proxy_config(dante_proxy, name="p", port=dead_port)])
    with pytest.raises(TransportError) as info:
        await handle.connect("127.0.0.1", echo_port, timeout=5)
    assert info.value.reason == "proxy_unreachable" and str(dead_port) in str(info.value)

    registry.reconfigure([good])
    sock = await handle.connect("127.0.0.1", echo_port, timeout=5)
    assert await echo_through(sock, b"b") == b"b"
    await registry.close()


@pytest.mark.fast
def test_unchanged_proxies_keep_their_transport() -> None:
    ssh = ProxyConfig(name="s", kind="ssh", host="127.0.0.1", port=22)
    socks = ProxyConfig(name="k", kind="socks5", host="127.0.0.1", port=1080)
    registry = Transports([ssh, socks])
    kept = registry.get("s")
    assert isinstance(kept, SshTransport) and isinstance(registry.get("k"), Socks5Transport)
    registry.reconfigure([ssh, ProxyConfig(name="k", kind="socks5", host="127.0.0.1",
                                           port=1081)])
    assert registry.get("s") is kept
    assert isinstance(registry.get(None), DirectTransport)


@pytest.mark.fast
def test_unknown_via_is_a_config_error() -> None:
    registry = Transports([])
    with pytest.raises(ConfigError):
        registry.for_upstream(upstream(25, "nope"))
    assert registry.for_upstream(upstream(25, None)).name == "direct"


@pytest.mark.fast
def test_where_a_proxy_is_written_is_not_a_change_its_key_file_is(tmp_path: Path) -> None:
    key = tmp_path / "id"
    key.write_text("first key\n")
    ssh = ProxyConfig(name="s", kind="ssh", host="127.0.0.1", port=22, key_file=key, line=10)
    registry = Transports([ssh])
    kept = registry.get("s")
    registry.reconfigure([dataclasses.replace(ssh, line=42)])     # an edit above it
    assert registry.get("s") is kept
    key.write_text("a rotated key, same file\n")
    registry.reconfigure([dataclasses.replace(ssh, line=42)])
    assert registry.get("s") is not kept


@pytest.mark.fast
async def test_a_retired_tunnel_closes_with_its_last_channel_and_unused_proxies_retire(
        ) -> None:
    ssh = ProxyConfig(name="s", kind="ssh", host="127.0.0.1", port=22)
    registry = Transports([ssh])
    old = registry.get("s")
    assert isinstance(old, SshTransport)
    registry.reconfigure([ssh], used=set())                        # nothing goes through it
    with pytest.raises(TransportError):
        registry.get("s")
    channel: asyncio.Task[None] = asyncio.get_running_loop().create_future()  # type: ignore[assignment]
    old._pumps.add(channel)                   # a session still uses the tunnel
    closed: list[bool] = []
    old._close_connection = lambda: closed.append(True)  # type: ignore[method-assign]
    await registry.close_retired()
    assert closed == [] and old._closed      # no new channels; the link stays for now
    old._channel_ended(channel)
    assert closed == [True]
    await registry.close()
