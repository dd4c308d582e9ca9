"""The transport registry: one transport per [[proxy]] plus direct, swapped on reload."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from relay.config.schema import ProxyConfig, UpstreamConfig
from relay.errors import ConfigError, TransportError
from relay.transports.base import Transport
from relay.transports.direct import DirectTransport
from relay.transports.socks5 import Socks5Transport
from relay.transports.ssh import SshTransport

log = logging.getLogger("relay.transports")


def build(cfg: ProxyConfig) -> Transport:
    """The transport for one [[proxy]] entry."""
    if cfg.kind == "socks5":
        return Socks5Transport(cfg)
    if cfg.kind == "ssh":
        return SshTransport(cfg)
    raise ConfigError(f"proxy {cfg.name}: unknown kind {cfg.kind!r}", line=cfg.line,
                      expected='"socks5" or "ssh"')


class Via:
    """An upstream's handle on its proxy, looked up at every connect.

    Delivery and the IMAP/POP3 proxy may keep this object: after a reload that changes the
    proxy, the next connection goes through the new transport.
    """

    def __init__(self, registry: Transports, proxy: str | None) -> None:
        self._registry = registry
        self.proxy = proxy
        self.name = proxy or "direct"

    @property
    def current(self) -> Transport:
        return self._registry.get(self.proxy)

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        return await self.current.connect(host, port, timeout=timeout)

    async def connect_timed(self, host: str, port: int, *,
                            timeout: float) -> tuple[socket.socket, dict[str, float]]:
        """Connect and report per-step timings (proxy/SSH steps; empty for direct)."""
        return await connect_timed(self.current, host, port, timeout=timeout)

    async def close(self) -> None:
        return None      # the registry owns the transports


async def connect_timed(transport: Transport, host: str, port: int, *,
                        timeout: float) -> tuple[socket.socket, dict[str, float]]:
    """``transport.connect`` with its step timings when the transport reports them."""
    timed = getattr(transport, "connect_timed", None)
    if timed is not None:
        result: tuple[socket.socket, dict[str, float]] = await timed(host, port,
                                                                     timeout=timeout)
        return result
    return await transport.connect(host, port, timeout=timeout), {}


class Transports:
    """Builds and owns every transport; ``for_upstream`` hands out reload-proof handles."""

    def __init__(self, proxies: Sequence[ProxyConfig] = ()) -> None:
        self._direct = DirectTransport()
        self._configs: dict[str, ProxyConfig] = {}
        self._transports: dict[str, Transport] = {}
        self._retired: list[Transport] = []
        self._install(proxies)

    def _install(self, proxies: Sequence[ProxyConfig]) -> list[Transport]:
        configs = {p.name: p for p in proxies}
        old = []
        transports: dict[str, Transport] = {}
        for name, cfg in configs.items():
            if self._configs.get(name) == cfg:
                transports[name] = self._transports[name]      # unchanged: keep the SSH link
            else:
                transports[name] = build(cfg)
        for name, t in self._transports.items():
            if transports.get(name) is not t:
                old.append(t)
        self._configs, self._transports = configs, transports
        return old

    def get(self, proxy: str | None) -> Transport:
        """The current transport for a proxy name (None: direct)."""
        if proxy is None:
            return self._direct
        try:
            return self._transports[proxy]
        except KeyError:
            raise TransportError(f"no [[proxy]] named {proxy!r}", reason="proxy_unknown",
                                 hint="the upstream's via must name a [[proxy]] entry") from None

    def for_upstream(self, cfg: UpstreamConfig) -> Via:
        """The transport of an upstream (its ``via`` proxy, or direct), reload-proof."""
        if cfg.via is not None and cfg.via not in self._transports:
            raise ConfigError(f"upstream {cfg.name}: via names no [[proxy]]", line=cfg.line,
                              key="via", got=repr(cfg.via),
                              expected="the name of a [[proxy]] entry")
        return Via(self, cfg.via)

    def via(self, proxy: str | None) -> Via:
        """A handle for a proxy name (token sources' ``via``)."""
        if proxy is not None:
            self.get(proxy)
        return Via(self, proxy)

    def reconfigure(self, proxies: Sequence[ProxyConfig]) -> None:
        """Swap in the proxies of a new config; changed or removed ones are retired.

        Connections already open through a retired transport keep going; the next
        ``close_retired()`` (or ``close()``) shuts their long-lived links.
        """
        retired = self._install(proxies)
        for t in retired:
            log.info("proxy %s changed or removed: new connections use the new config", t.name)
        self._retired += retired

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        await asyncio.gather(*(t.close() for t in retired), return_exceptions=True)

    async def close(self) -> None:
        await self.close_retired()
        transports, self._transports = list(self._transports.values()), {}
        self._configs = {}
        await asyncio.gather(*(t.close() for t in transports), return_exceptions=True)
