"""The SOCKS5 transport (python-socks): RFC 1929 login, remote DNS, classified failures."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

from python_socks import ProxyError, ProxyTimeoutError, ProxyType
from python_socks.async_.asyncio import Proxy

from relay.config.schema import ProxyConfig
from relay.errors import TransportError
from relay.transports.direct import DirectTransport

# RFC 1928 section 6 reply codes: (reason label, name, what the operator should do).
REPLY_CODES: dict[int, tuple[str, str, str]] = {
    0x01: ("proxy_refused_general", "general SOCKS server failure",
           "the proxy failed for its own reasons: read its log for this connection"),
    0x02: ("proxy_refused_ruleset", "connection not allowed by ruleset",
           "the proxy's rules do not allow this destination for this user: allow the "
           "provider's host and port there (Dante: a `socks pass` rule with `command: "
           "connect`)"),
    0x03: ("proxy_refused_network_unreachable", "network unreachable",
           "the proxy host has no route to the destination: check its routing and outbound "
           "firewall"),
    0x04: ("proxy_refused_host_unreachable", "host unreachable",
           "the proxy cannot reach (or, with remote DNS, cannot resolve) the destination: "
           "check DNS and the outbound firewall on the proxy host"),
    0x05: ("proxy_refused_connection_refused", "connection refused by destination host",
           "the destination refused the proxy's connection: check the upstream's host and "
           "port, and that the service is up"),
    0x06: ("proxy_refused_ttl_expired", "TTL expired",
           "the proxy's connection to the destination timed out: the destination or a "
           "firewall behind the proxy drops the traffic"),
    0x07: ("proxy_refused_command", "command not supported",
           "the proxy does not support CONNECT: check that it is a SOCKS5 proxy for TCP"),
    0x08: ("proxy_refused_address_type", "address type not supported",
           "the proxy cannot handle this kind of address: toggle remote_dns on the [[proxy]] "
           "(names resolved by the proxy or by relay) or use an IPv4 destination"),
}


def classify_socks_error(exc: BaseException, proxy: ProxyConfig, dest: str) -> TransportError:
    """Map a python-socks exception raised during the handshake to a TransportError."""
    where = f"SOCKS5 proxy {proxy.name} ({proxy.host}:{proxy.port})"
    code = getattr(exc, "error_code", None)
    if isinstance(exc, ProxyError) and code in REPLY_CODES:
        reason, name, hint = REPLY_CODES[code]
        return TransportError(f"{where} refused the connection to {dest}: {name} "
                              f"(RFC 1928 reply {code:#04x})", reason=reason, hint=hint)
    text = str(exc)
    if isinstance(exc, TimeoutError):   # ProxyTimeoutError is one
        return TransportError(
            f"{where} accepted the TCP connection but did not finish the SOCKS5 handshake for "
            f"{dest} in time", reason="proxy_timeout",
            hint="the proxy may be overloaded, slow to reach the destination, or not a SOCKS5 "
                 "server at that port")
    if "authentication failure" in text.lower():
        return TransportError(
            f"{where} rejected the username/password of user '{proxy.username}' "
            f"(RFC 1929 status non-zero; Java clients log this as "
            f"\"SOCKS : authentication failed\")",
            reason="proxy_auth_failed",
            hint=f"check the username and password of [[proxy]] {proxy.name}"
                 + (f" (password from {proxy.password.origin})"
                    if proxy.password and proxy.password.origin else "")
                 + "; with Dante's `socksmethod: username` the user must exist in the "
                   "proxy host's password database")
    if "no acceptable authentication methods" in text.lower():
        if proxy.username and proxy.password:
            msg = f"{where} does not accept username/password authentication"
            hint = "the proxy wants another method: check its socksmethod settings"
        else:
            msg = f"{where} requires authentication but no username/password is configured"
            hint = (f"set the username in [[proxy]] {proxy.name}'s url and its password "
                    "(password_env / password_file)")
        return TransportError(msg, reason="proxy_auth_failed", hint=hint)
    if isinstance(exc, UnicodeEncodeError):
        return TransportError(f"{where}: the username or password is not ASCII",
                              reason="proxy_auth_failed",
                              hint="RFC 1929 credentials must be ASCII for python-socks")
    if isinstance(exc, OSError) or "closed unexpectedly" in text.lower():
        return TransportError(
            f"{where} closed the connection during the SOCKS5 handshake for {dest}",
            reason="proxy_handshake_failed",
            hint="the proxy's client rules may not allow this host (Dante: `client pass`), or "
                 "the port is not a SOCKS5 proxy")
    return TransportError(f"{where} failed the SOCKS5 handshake for {dest}: {text}",
                          reason="proxy_handshake_failed",
                          hint="check the proxy's log for this connection")


class _Connected:
    """Hands python-socks an already connected socket through its ``forward`` hook."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def connect(self, dest_host: str, dest_port: int, timeout: float | None = None,
                      **_kwargs: Any) -> socket.socket:
        return self._sock


class Socks5Transport:
    """Connects through a SOCKS5 proxy; TCP to the proxy and the handshake timed apart."""

    def __init__(self, cfg: ProxyConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._direct = DirectTransport()

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        sock, _timings = await self.connect_timed(host, port, timeout=timeout)
        return sock

    async def connect_timed(self, host: str, port: int, *,
                            timeout: float) -> tuple[socket.socket, dict[str, float]]:
        """Connect and report ``{"proxy_connect": s, "proxy_handshake": s}``."""
        cfg = self.cfg
        dest = f"{host}:{port}"
        started = time.monotonic()
        try:
            sock = await self._direct.connect(cfg.host, cfg.port,
                                              timeout=min(timeout, cfg.connect_timeout))
        except TransportError as exc:
            raise self._unreachable(exc) from exc
        connected = time.monotonic()
        password = cfg.password.reveal() if cfg.password is not None else None
        proxy = Proxy(ProxyType.SOCKS5, cfg.host, cfg.port, username=cfg.username or None,
                      password=password, rdns=cfg.remote_dns,
                      forward=_Connected(sock),  # type: ignore[arg-type]
                      loop=asyncio.get_running_loop())
        remaining = max(0.1, timeout - (connected - started))
        try:
            out = await proxy.connect(host, port, timeout=remaining)
        except (ProxyError, ProxyTimeoutError, OSError, UnicodeEncodeError) as exc:
            sock.close()
            raise classify_socks_error(exc, cfg, dest) from None
        except BaseException:
            sock.close()
            raise
        return out, {"proxy_connect": connected - started,
                     "proxy_handshake": time.monotonic() - connected}

    def _unreachable(self, exc: TransportError) -> TransportError:
        cfg = self.cfg
        where = f"SOCKS5 proxy {cfg.name} at {cfg.host}:{cfg.port}"
        hint = (f"check that the proxy runs and that this host may reach it (firewall), and "
                f"the host and port of [[proxy]] {cfg.name}")
        if exc.reason == "connect_timeout":
            return TransportError(f"connect timed out: {where} did not answer "
                                  f"({exc})", reason="proxy_unreachable", hint=hint)
        if exc.reason == "connect_refused":
            return TransportError(f"connection refused: nothing listens at {where}",
                                  reason="proxy_unreachable", hint=hint)
        if exc.reason == "dns_failed":
            return TransportError(f"cannot resolve the {where}: {exc}",
                                  reason="proxy_unreachable",
                                  hint="check the proxy's host name and this host's DNS")
        return TransportError(f"cannot reach {where}: {exc}", reason="proxy_unreachable",
                              hint=hint)

    async def close(self) -> None:
        return None
