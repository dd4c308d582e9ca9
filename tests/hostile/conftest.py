"""Fixtures of the hostile catalogue: a real SMTP listener per case (what it stored, its
metrics), a real IMAP/POP3 proxy listener per case in front of the module's Dovecot (how
often it reached the provider), and the log records each wrote."""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.config.schema import HostPort, ListenerConfig, Secret, UpstreamConfig
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.proxy.accounts import build_authenticator
from relay.proxy.listener import ProxyListener
from relay.smtp.listener import SmtpListener
from relay.throttle import FailureThrottle
from relay.users import UserDB
from tests.peers.dovecot import Dovecot
from tests.proxy.conftest import (  # noqa: F401  (dc, relay_cert: fixtures, used by name)
    CountingTransport,
    dc,
    relay_cert,
    upstream_port,
)
from tests.smtp.conftest import (  # noqa: F401  (fixtures, used by name)
    PASSWORD,
    Recorder,
    ca,
    certs,
    user_hashes,
    users_file,
)

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@dataclasses.dataclass
class SmtpRelay:
    listener: SmtpListener
    recorder: Recorder
    metrics: Metrics
    port: int
    ca: trustme.CA

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


StartSmtp = Callable[..., Awaitable[SmtpRelay]]


@pytest.fixture
async def smtp_relay(certs: tuple[Path, Path], users_file: Path,  # noqa: F811
                     ca: trustme.CA) -> AsyncIterator[StartSmtp]:  # noqa: F811
    """Start an SMTP listener: STARTTLS, AUTH against a users file, loopback allow-listed,
    fast throttles, and the given ListenerConfig fields (``account_fail_limit`` sets the
    shared per-account throttle)."""
    started: list[SmtpListener] = []

    async def start(**opts: Any) -> SmtpRelay:
        cert, key = certs
        account_limit = opts.pop("account_fail_limit", 5)
        fields: dict[str, Any] = dict(
            name="platform", protocol="smtp", listen=HostPort("127.0.0.1", 0),
            tls="starttls", cert=cert, key=key, auth="required", users_file=users_file,
            allow=LOOPBACK)
        fields.update(opts)
        if fields["tls"] == "none":
            fields.update(cert=None, key=None)
        metrics = Metrics()
        recorder = Recorder()
        accounts = FailureThrottle.for_accounts(limit=account_limit, window=60.0,
                                                base_delay=0.0, metrics=metrics)
        listener = SmtpListener(ListenerConfig(**fields), hostname="relay.test",
                                accept=recorder, maillog=MailLog(), users=UserDB.load(users_file),
                                metrics=metrics, auth_base_delay=0.0, accounts=accounts)
        await listener.start()
        started.append(listener)
        return SmtpRelay(listener, recorder, metrics, listener.addresses[0][1], ca)

    yield start
    for listener in started:
        await listener.stop_accepting()
        await listener.wait_closed(1.0)


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """Log records at ERROR or above (a traceback is always one): must stay empty."""
    caplog.set_level(logging.INFO)

    def found() -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in caplog.records
                if r.levelno >= logging.ERROR]
    return found


AGENT = ("agent", "agent-pw")          # relay's own user of the proxy cases


async def verify_agent(user: str, password: Secret) -> bool:
    return (user, password.reveal()) == AGENT


@dataclasses.dataclass
class ProxyRelay:
    listener: ProxyListener
    transport: CountingTransport
    metrics: Metrics
    port: int
    ca_file: Path

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


StartProxy = Callable[..., Awaitable[ProxyRelay]]


@pytest.fixture
async def proxy_relay(dc: Dovecot, relay_cert: tuple[Path, Path]  # noqa: F811
                      ) -> AsyncIterator[StartProxy]:
    """Start an IMAP or POP3 proxy listener in front of Dovecot. relay checks the client's
    login itself (user ``agent``) and logs in to Dovecot as alice; every connection toward
    Dovecot is counted. ``opts`` are ListenerConfig fields (``account_fail_limit`` sets
    the shared per-account throttle)."""
    started: list[ProxyListener] = []

    async def start(protocol: str, **opts: Any) -> ProxyRelay:
        account_limit = opts.pop("account_fail_limit", 5)
        up = UpstreamConfig(name="dovecot", protocol=protocol,  # type: ignore[arg-type]
                            host="localhost", port=upstream_port(dc, protocol, "none"),
                            tls="none", auth="password", username="alice",
                            password=Secret(dc.users["alice"]), connect_timeout=10,
                            command_timeout=20)
        fields: dict[str, Any] = dict(
            name=f"{protocol}-in", protocol=protocol, listen=HostPort("127.0.0.1", 0),
            tls="none", allow_plaintext_auth=True, upstream="dovecot")
        fields.update(opts)
        if fields["tls"] != "none":
            fields.update(cert=relay_cert[0], key=relay_cert[1], allow_plaintext_auth=False)
        metrics = Metrics()
        transport = CountingTransport()
        accounts = FailureThrottle.for_accounts(limit=account_limit, window=60.0,
                                                base_delay=0.0, metrics=metrics)
        listener = ProxyListener(ListenerConfig(**fields), upstream=up,
                                 authenticator=build_authenticator(up, (), verify_agent),
                                 transport_for=lambda _u: transport, metrics=metrics,
                                 fail_delay=0.0, fail_delay_max=0.0, accounts=accounts)
        await listener.start()
        started.append(listener)
        return ProxyRelay(listener, transport, metrics, listener.address[1], dc.ca_file)

    yield start
    for listener in started:
        await listener.stop_accepting()
        await listener.wait_closed(5)
