"""RelaySMTP sets up the same state as aiosmtpd's own SMTP.__init__ (kept in step on upgrades)."""

from __future__ import annotations

import pytest
from aiosmtpd.smtp import SMTP

from relay.config.schema import HostPort, ListenerConfig
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.smtp.handler import Context
from relay.smtp.server import RelaySMTP

pytestmark = pytest.mark.fast


async def _accept(envelope: Envelope, data: bytes) -> str:
    return "X"


async def test_relay_session_has_every_attribute_stock_init_sets() -> None:
    stock = SMTP(object(), hostname="h")
    cfg = ListenerConfig(name="l", protocol="smtp", listen=HostPort("127.0.0.1", 0), tls="none")
    ours = RelaySMTP(Context(cfg=cfg, hostname="h", accept=_accept, maillog=MailLog()))
    missing = set(vars(stock)) - set(vars(ours))
    assert not missing, f"aiosmtpd's SMTP.__init__ now sets {missing}: update RelaySMTP"
    assert set(ours._smtp_methods) >= {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "AUTH",
                                       "STARTTLS", "QUIT", "RSET", "NOOP"}
    assert ours._smtp_methods["DATA"].__func__ is RelaySMTP.smtp_DATA
