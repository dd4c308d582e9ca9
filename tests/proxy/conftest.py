"""Fixtures for proxy integration tests: one Dovecot per module, a relay proxy per test."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relay.config.schema import HostPort, ListenerConfig, Secret, UpstreamConfig
from relay.metrics import Metrics
from relay.proxy.accounts import Authenticator, build_authenticator
from relay.proxy.listener import ProxyListener
from relay.transports.base import Transport
from relay.transports.direct import DirectTransport
from tests.peers.dovecot import Dovecot, dovecot

USERS = {"alice": "alice-pw", "bob": "bob-token-1"}     # bob logs in with XOAUTH2 only


@pytest.fixture(scope="module")
def dc() -> Iterator[Dovecot]:
    with dovecot(users=USERS) as d:
        yield d


@pytest.fixture(scope="module")
def relay_cert(dc: Dovecot, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for relay's listeners, signed by the same test CA as Dovecot's."""
    d = tmp_path_factory.mktemp("relaycert")
    # fetchmail checks the subject CN, not only the subjectAltName
    issued = dc.ca.issue_cert("localhost", "127.0.0.1", common_name="localhost")
    cert, key = d / "cert.pem", d / "key.pem"
    issued.private_key_and_cert_chain_pem.write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


class CountingTransport:
    """The direct transport, counting connections (to prove nothing reached the provider)."""

    def __init__(self, inner: Transport | None = None) -> None:
        self.inner = inner or DirectTransport()
        self.name = self.inner.name
        self.connects = 0

    async def connect(self, host: str, port: int, *, timeout: float) -> socket.socket:
        self.connects += 1
        return await self.inner.connect(host, port, timeout=timeout)

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Running:
    listener: ProxyListener
    transport: CountingTransport
    metrics: Metrics
    port: int
    tokens: list[str] = field(default_factory=list)

    def client_context(self, dc: Dovecot) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(dc.ca_file))

    def metric(self, name: str, labels: dict[str, str]) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


def upstream_port(dc: Dovecot, protocol: str, tls: str) -> int:
    if protocol == "imap":
        return dc.imaps if tls == "implicit" else dc.imap
    return dc.pop3s if tls == "implicit" else dc.pop3


@contextlib.asynccontextmanager
async def run_proxy(dc: Dovecot, cert: tuple[Path, Path] | None = None, *,
                    protocol: str = "imap", tls: str = "none", up_tls: str = "none",
                    auth: str = "passthrough", username: str = "", password: str | None = None,
                    token_source: str | None = None,
                    verify: Callable[[str, Secret], Awaitable[bool]] | None = None,
                    token_for: Callable[[str], Awaitable[str]] | None = None,
                    inner_transport: Transport | None = None, host: str = "localhost",
                    fail_delay: float = 0.05, kernel_splice: bool = True,
                    **listener_kw: Any) -> AsyncIterator[Running]:
    up = UpstreamConfig(name="dovecot", protocol=protocol,  # type: ignore[arg-type]
                        host=host, port=upstream_port(dc, protocol, up_tls),
                        tls=up_tls, ca_file=dc.ca_file, auth=auth,  # type: ignore[arg-type]
                        username=username, password=Secret(password) if password else None,
                        token_source=token_source, connect_timeout=10, command_timeout=20)
    lcfg = ListenerConfig(name=f"{protocol}-in", protocol=protocol,  # type: ignore[arg-type]
                          listen=HostPort("127.0.0.1", 0), tls=tls,  # type: ignore[arg-type]
                          cert=cert[0] if cert else None, key=cert[1] if cert else None,
                          upstream="dovecot", **listener_kw)
    transport = CountingTransport(inner_transport)
    metrics = Metrics()
    authenticator: Authenticator = build_authenticator(up, (), verify)
    listener = ProxyListener(lcfg, upstream=up, authenticator=authenticator,
                             transport_for=lambda _u: transport, token_for=token_for,
                             metrics=metrics, fail_delay=fail_delay, fail_delay_max=1.0,
                             kernel_splice=kernel_splice)
    await listener.start()
    try:
        yield Running(listener, transport, metrics, listener.address[1])
    finally:
        await listener.stop_accepting()
        await listener.wait_closed(5)


async def until(cond: Callable[[], bool], *, timeout: float = 10.0) -> None:
    """Wait (bounded) for loop-side state, e.g. a session count, to reach a condition."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 (state changes in callbacks; no event to wait on)
            await asyncio.sleep(0.02)
