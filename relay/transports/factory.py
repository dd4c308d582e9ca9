"""The transport registry: one transport per [[proxy]] plus direct, swapped on reload."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from relay.config.schema import Config, ProxyConfig, UpstreamConfig
from relay.errors import ConfigError, TransportError
from relay.transports.base import Transport
from relay.transports.direct import DirectTransport
from relay.transports.socks5 import Socks5Transport

log = logging.getLogger("relay.transports")


FileStamp = tuple[int, int, int] | None


def file_stamp(path: Path | None) -> FileStamp:
    """(inode, size, mtime ns) of a file, so a rewritten key counts as a change."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def without_line(entry: Any) -> Any:
    """A config entry with its ``line`` zeroed (where it is written is not what it is)."""
    return dataclasses.replace(entry, line=0) if hasattr(entry, "line") else entry


def proxy_identity(cfg: ProxyConfig) -> tuple[ProxyConfig, FileStamp, FileStamp]:
    """A [[proxy]] as far as its connections go: its settings (not where they are written)
    and the contents of its key and known_hosts files, re-read at every reload."""
    return without_line(cfg), file_stamp(cfg.key_file), file_stamp(cfg.known_hosts)


def used_proxies(config: Config) -> set[str]:
    """The [[proxy]] names a config's upstreams and token sources go through."""
    return {u.via for u in config.upstreams if u.via} | \
        {t.via for t in config.token_sources if t.via}


def build(cfg: ProxyConfig) -> Transport:
    """The transport for one [[proxy]] entry."""
    if cfg.kind == "socks5":
        return Socks5Transport(cfg)
    if cfg.kind == "ssh":
        # asyncssh (about 7 MB of memory) is loaded only by a config with an SSH tunnel.
        from relay.transports.ssh import SshTransport
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
        self._ids: dict[str, tuple[ProxyConfig, FileStamp, FileStamp]] = {}
        self._transports: dict[str, Transport] = {}
        self._retired: list[Transport] = []
        self._lingering: list[Transport] = []   # retired, closing once unused
        self._install(proxies)

    def _install(self, proxies: Sequence[ProxyConfig]) -> list[Transport]:
        ids = {p.name: proxy_identity(p) for p in proxies}
        old = []
        transports: dict[str, Transport] = {}
        for p in proxies:
            if self._ids.get(p.name) == ids[p.name]:
                transports[p.name] = self._transports[p.name]  # unchanged: keep the SSH link
            else:
                transports[p.name] = build(p)
        for name, t in self._transports.items():
            if transports.get(name) is not t:
                old.append(t)
        self._ids, self._transports = ids, transports
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

    def reconfigure(self, proxies: Sequence[ProxyConfig], *,
                    used: Collection[str] | None = None) -> None:
        """Swap in the proxies of a new config; changed or removed ones are retired, and
        so are those no upstream or token source uses any more (``used``: their names).

        A proxy is unchanged when its settings and its key and known_hosts files are
        (where it is written in the file does not count). Connections already open
        through a retired transport keep going; ``close_retired()`` closes its long-lived
        link (an SSH connection) as soon as none of them uses it any more.
        """
        if used is not None:
            proxies = [p for p in proxies if p.name in used]
        retired = self._install(proxies)
        for t in retired:
            log.info("proxy %s changed, removed or no longer used: new connections use the "
                     "new config", t.name)
        self._retired += retired

    async def close_retired(self) -> None:
        """Let retired transports go: each closes once nothing uses it (SSH: its last
        channel ended); ones without long-lived links have nothing to close."""
        retired, self._retired = self._retired, []
        closing = []
        for t in retired:
            retire = getattr(t, "retire", None)
            if retire is None:
                closing.append(t.close())
            else:
                retire()
                self._lingering.append(t)
        await asyncio.gather(*closing, return_exceptions=True)

    async def close(self) -> None:
        await self.close_retired()
        transports = [*self._lingering, *self._transports.values()]
        self._transports, self._lingering, self._ids = {}, [], {}
        await asyncio.gather(*(t.close() for t in transports), return_exceptions=True)
