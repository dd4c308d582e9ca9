"""The aiosmtpd and asyncio internals relay's SMTP sessions rely on, kept in one place.

- ``init_aiosmtpd_state`` sets up what ``aiosmtpd.smtp.SMTP.__init__`` sets up, minus its
  per-connection introspection (``inspect.getmembers`` over session and handler costs
  ~0.3 ms of CPU per connection, a third of a small message's budget).
  ``tests/smtp/test_server_init.py`` fails when an aiosmtpd upgrade adds state.
- ``unread`` gives bytes read past the end of DATA back to the stream reader, which has
  no public way to do so; ``has_line`` peeks whether the next command is already there.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from typing import Any

from relay.smtp import replies

log = logging.getLogger("relay.smtp")

_COMMANDS: dict[type, tuple[str, ...]] = {}


class _Hooks:
    """aiosmtpd's handler object: relay overrides the commands, so only errors land here."""

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %r", error, exc_info=error)
        return replies.LOCAL_ERROR


_HOOKS = _Hooks()


def commands(cls: type) -> tuple[str, ...]:
    """The SMTP verbs a session class implements (its smtp_* methods), computed once."""
    names = _COMMANDS.get(cls)
    if names is None:
        names = _COMMANDS[cls] = tuple(m[5:] for m in dir(cls) if m.startswith("smtp_"))
    return names


def init_aiosmtpd_state(session: Any, *, loop: asyncio.AbstractEventLoop, hostname: str,
                        data_size_limit: int, timeout: float,
                        tls_context: ssl.SSLContext | None, auth_require_tls: bool) -> None:
    """What ``SMTP.__init__`` (aiosmtpd 1.4) sets on ``session``, for relay's overrides."""
    asyncio.StreamReaderProtocol.__init__(
        session, asyncio.StreamReader(loop=loop, limit=session.line_length_limit),
        client_connected_cb=session._cb_client_connected, loop=loop)
    session.__ident__ = "ESMTP"
    session.loop = loop
    session.event_handler = _HOOKS
    session.data_size_limit = data_size_limit
    session.enable_SMTPUTF8 = True
    session._decode_data = False
    # aiosmtpd keeps these limits in a class-wide dict; each session gets its own.
    session.command_size_limits = defaultdict(lambda: 512, MAIL=1024, RCPT=1024, AUTH=12288)
    session.hostname = hostname
    session.tls_context = tls_context
    session.require_starttls = False
    session._timeout_duration = timeout
    session._timeout_handle = None
    session._tls_handshake_okay = True
    session._tls_protocol = None
    session._original_transport = None
    session.session = None
    session.envelope = None
    session.transport = None
    session._handler_coroutine = None
    session._auth_require_tls = auth_require_tls
    session._proxy_timeout = None
    session._authenticator = None
    session._auth_callback = None
    session._auth_required = False
    session._auth_methods = {}
    session._handle_hooks = {}
    session._ehlo_hook_ver = None
    session._smtp_methods = {name: getattr(session, f"smtp_{name}")
                             for name in commands(type(session))}
    session._enforce_call_limit = False


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back at the front of ``reader`` (pipelined commands after DATA)."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]  # no public unread in asyncio


def has_line(reader: asyncio.StreamReader) -> bool:
    """True when a whole command line is already buffered (the client is pipelining)."""
    return b"\n" in reader._buffer  # type: ignore[attr-defined]
