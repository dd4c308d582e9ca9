"""The one transport interface every upstream connection goes through."""

from __future__ import annotations

import socket
from typing import Protocol


class Transport(Protocol):
    """Opens a TCP byte stream to ``host:port``, directly or through a tunnel.

    The result is always a connected, blocking-mode-agnostic ``socket.socket`` that the
    caller hands to asyncio (``asyncio.open_connection(sock=...)``, aiosmtplib's
    ``sock=``), so TLS and STARTTLS work identically over every transport. SSH channels
    are bridged to a local socketpair by the SSH transport.

    Raises ``relay.errors.TransportError`` with a classified ``reason`` on failure.
    """

    name: str   # "direct" or the [[proxy]] name; used as a metric label

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket: ...

    async def close(self) -> None:
        """Release long-lived resources (SSH connections); idempotent."""
        ...
