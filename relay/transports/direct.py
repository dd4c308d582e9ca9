"""The direct transport: a plain TCP connection from this host, with classified errors."""

from __future__ import annotations

import asyncio
import errno
import socket

from relay.errors import TransportError


class DirectTransport:
    """Connects straight to the destination (names resolved off the loop by asyncio)."""

    name = "direct"

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except TimeoutError as exc:
            raise TransportError(f"resolving {host} timed out after {timeout:g}s",
                                 reason="dns_failed",
                                 hint="check the DNS servers this host uses") from exc
        except socket.gaierror as exc:
            raise TransportError(f"cannot resolve {host}: {exc.strerror}", reason="dns_failed",
                                 hint="check the upstream's host name and this host's DNS; "
                                      "if only a proxy can resolve it, set via = a proxy"
                                 ) from exc
        last: OSError | None = None
        for family, type_, proto, _canon, addr in infos:
            sock = socket.socket(family, type_, proto)
            sock.setblocking(False)
            try:
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, addr)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return sock
            except TimeoutError as exc:
                sock.close()
                raise TransportError(
                    f"connect to {host}:{port} timed out after {timeout:g}s",
                    reason="connect_timeout",
                    hint="a firewall may drop the traffic; most contact-center networks need "
                         "a proxy: set via = \"<proxy name>\" on the upstream") from exc
            except OSError as exc:
                sock.close()
                last = exc
        assert last is not None
        reason = "connect_refused" if last.errno == errno.ECONNREFUSED else "connect_failed"
        raise TransportError(f"connect to {host}:{port} failed: {last.strerror or last}",
                             reason=reason,
                             hint="check host and port, and that the service is up") from last

    async def close(self) -> None:
        return None
