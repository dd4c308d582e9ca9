"""Fixtures of the hostile catalogue: a real SMTP listener per case, with what it stored,
the log records it wrote, and its metrics; the proxy fixtures come from tests/proxy."""

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

from relay.config.schema import HostPort, ListenerConfig
from relay.maillog import MailLog
from relay.metrics import Metrics
from relay.smtp.listener import SmtpListener
from relay.throttle import FailureThrottle
from relay.users import UserDB
from tests.proxy.conftest import dc, relay_cert  # noqa: F401  (fixtures, used by name)
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
