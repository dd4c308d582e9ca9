"""Canary: the aiosmtpd installed is one relay's private coupling was checked against.

relay.smtp.compat is the only module that touches aiosmtpd's private state. These tests
fail loudly, naming what changed, when an aiosmtpd release moves any of it: then update
compat.py (and the pin in pyproject.toml) before upgrading.
"""

from __future__ import annotations

import inspect
from importlib.metadata import requires, version

import pytest
from aiosmtpd.smtp import SMTP
from packaging.requirements import Requirement

from relay.config.schema import HostPort, ListenerConfig
from relay.envelope import Envelope
from relay.maillog import MailLog
from relay.smtp.compat import RELIES_ON
from relay.smtp.handler import Context
from relay.smtp.server import RelaySMTP

pytestmark = pytest.mark.fast


async def _accept(envelope: Envelope, data: bytes) -> str:
    return "X"


def test_installed_aiosmtpd_is_inside_the_pinned_range() -> None:
    [pin] = [Requirement(r) for r in requires("relay") or []
             if Requirement(r).name == "aiosmtpd"]
    assert pin.specifier, "pyproject.toml must pin aiosmtpd to a checked range"
    assert any(s.operator in ("<", "<=", "~=", "==") for s in pin.specifier), \
        f"aiosmtpd pin {pin} has no upper bound"
    installed = version("aiosmtpd")
    assert pin.specifier.contains(installed), \
        f"aiosmtpd {installed} is outside the checked range {pin.specifier}"


def test_every_private_member_relay_relies_on_is_there_with_its_parameters() -> None:
    stock = SMTP(object(), hostname="h")
    for name, params in RELIES_ON.items():
        if params is None:                     # an attribute of a live session
            assert hasattr(stock, name) or name in ("_reader", "_writer"), \
                f"aiosmtpd's SMTP no longer has {name}: update relay/smtp/compat.py"
            continue
        member = getattr(SMTP, name, None)
        assert callable(member), f"aiosmtpd's SMTP.{name} is gone: update relay/smtp/compat.py"
        got = tuple(inspect.signature(member).parameters)[1:]
        assert got == params, (f"aiosmtpd's SMTP.{name} now takes {got}, relay relies on "
                               f"{params}: update relay/smtp/compat.py")


def test_stream_attributes_are_set_where_relay_reads_them() -> None:
    # _reader and _writer are set by _cb_client_connected; relay reads them through
    # AiosmtpdSession.reader/writer.
    source = inspect.getsource(SMTP._cb_client_connected)
    assert "self._reader = reader" in source and "self._writer = writer" in source


async def test_relay_session_has_every_attribute_stock_init_sets() -> None:
    stock = SMTP(object(), hostname="h")
    cfg = ListenerConfig(name="l", protocol="smtp", listen=HostPort("127.0.0.1", 0), tls="none")
    ours = RelaySMTP(Context(cfg=cfg, hostname="h", accept=_accept, maillog=MailLog()))
    missing = set(vars(stock)) - set(vars(ours))
    assert not missing, f"aiosmtpd's SMTP.__init__ now sets {missing}: update RelaySMTP"
    assert set(ours._smtp_methods) >= {"EHLO", "HELO", "MAIL", "RCPT", "DATA", "AUTH",
                                       "STARTTLS", "QUIT", "RSET", "NOOP"}
    assert ours._smtp_methods["DATA"].__func__ is RelaySMTP.smtp_DATA


def test_the_hooks_relay_adds_still_see_what_they_expect() -> None:
    """Unknown verbs reach relay through ``_smtp_methods.get``; aiosmtpd's own replies to
    unparsable lines are counted as junk by their text; a failed STARTTLS surfaces as
    TLSSetupException with its cause (relay.smtp.compat)."""
    from aiosmtpd.smtp import TLSSetupException

    from relay.smtp.compat import SYNTAX_ERRORS

    loop_source = inspect.getsource(SMTP._handle_client)
    assert "self._smtp_methods.get(command)" in loop_source
    for reply in SYNTAX_ERRORS:
        assert f"'{reply}'" in loop_source, f"aiosmtpd no longer replies {reply!r}"
    assert "raise TLSSetupException() from error" in inspect.getsource(SMTP.smtp_STARTTLS)
    assert issubclass(TLSSetupException, Exception)
