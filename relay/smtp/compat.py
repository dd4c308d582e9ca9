"""The one place relay touches aiosmtpd's (and asyncio's) private state.

aiosmtpd is the brief's SMTP server library: relay keeps its command loop, STARTTLS and
stream plumbing and overrides the commands. What that needs beyond aiosmtpd's public
API lives here, nowhere else, behind stable names (``AiosmtpdSession``):

- ``init_aiosmtpd_state`` sets up what ``aiosmtpd.smtp.SMTP.__init__`` sets up, minus its
  per-connection introspection (``inspect.getmembers`` over session and handler costs
  ~0.3 ms of CPU per connection, a third of a small message's budget);
- the stream reader and writer, whether STARTTLS is active, resetting the transaction,
  the end-of-DATA state, the command timer, and hooks at session start and on timeout;
- ``unread`` gives bytes read past the end of DATA back to the stream reader, which has
  no public way to do so; ``has_line`` peeks whether the next command is already there;
- commands aiosmtpd does not know go to ``on_unknown_command`` (instead of its own
  budget of five), its own syntax-error replies to ``on_syntax_error``, the first bytes
  of each command line to ``screen`` (non-SMTP input), a failed STARTTLS handshake to
  ``on_tls_failed`` (one INFO line instead of a traceback), and ``keep_deadline`` lets a
  command leave the command deadline where it was (junk does not extend it).

``pyproject.toml`` pins the aiosmtpd releases this was checked against, and
``tests/smtp/test_aiosmtpd_canary.py`` fails loudly when an aiosmtpd release changes
anything in ``RELIES_ON`` or adds state to ``SMTP.__init__``.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import defaultdict
from typing import Any

from aiosmtpd.smtp import SMTP, Session, TLSSetupException

from relay.smtp import replies

log = logging.getLogger("relay.smtp")

_COMMANDS: dict[type, tuple[str, ...]] = {}

# aiosmtpd.smtp.SMTP's private members relay uses, with their parameters (after self):
# the canary test compares these with the installed aiosmtpd.
RELIES_ON: dict[str, tuple[str, ...] | None] = {
    "_reset_timeout": ("duration",),        # overridden: one re-armed timer per session
    "_timeout_cb": (),                      # extended: a 421 before closing
    "_handle_client": (),                   # extended: refuse before the greeting
    "_set_post_data_state": (),             # extended: end relay's transaction too
    "_set_rset_state": (),
    "_cb_client_connected": ("reader", "writer"),
    "_reader": None,                        # attributes set by the stream protocol
    "_writer": None,
    "_tls_protocol": None,
    "_original_transport": None,            # set by STARTTLS: a handshake under way
    "_timeout_handle": None,
    "_timeout_duration": None,
    "_smtp_methods": None,                  # replaced: unknown verbs come to relay
    "handle_exception": ("error",),         # extended: a failed STARTTLS is not an error
}

# aiosmtpd's own replies to lines it cannot parse (empty, not ASCII, too long): junk.
SYNTAX_ERRORS = frozenset({"500 Error: bad syntax", "500 Command line too long",
                           "500 Error: strict ASCII mode"})


class _Hooks:
    """aiosmtpd's handler object: relay overrides the commands, so only errors land here."""

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %r", error, exc_info=error)
        return replies.LOCAL_ERROR


_HOOKS = _Hooks()


class _Verbs(dict[str, Any]):
    """``SMTP._smtp_methods``: a verb aiosmtpd looks up and does not know goes to relay."""

    def __init__(self, session: Any) -> None:
        super().__init__((name, getattr(session, f"smtp_{name}"))
                         for name in commands(type(session)))
        self._unknown = session.on_unknown_command

    def get(self, verb: str, default: Any = None) -> Any:
        method = super().get(verb)
        if method is not None:
            return method

        async def unknown(arg: str | None) -> None:
            await self._unknown(verb, arg)
        return unknown


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
    session._smtp_methods = _Verbs(session)
    session._enforce_call_limit = False


def unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Put ``data`` back at the front of ``reader`` (pipelined commands after DATA)."""
    reader._buffer[:0] = data  # type: ignore[attr-defined]  # no public unread in asyncio


def has_line(reader: asyncio.StreamReader) -> bool:
    """True when a whole command line is already buffered (the client is pipelining)."""
    return b"\n" in reader._buffer  # type: ignore[attr-defined]


class AiosmtpdSession(SMTP):
    """aiosmtpd's SMTP protocol with the private parts relay uses given stable names.

    Subclasses (``relay.smtp.server.RelaySMTP``) call ``init_state`` instead of
    ``SMTP.__init__`` and override ``refuse_at_connect``, ``on_timeout`` and
    ``on_end_of_data``.
    """

    _deadline: float
    _timer_at: float
    _previous_deadline: float

    def init_state(self, *, hostname: str, data_size_limit: int, timeout: float,
                   tls_context: ssl.SSLContext | None, auth_require_tls: bool) -> None:
        self._deadline = 0.0
        self._timer_at = 0.0
        self._previous_deadline = 0.0
        init_aiosmtpd_state(self, loop=asyncio.get_running_loop(), hostname=hostname,
                            data_size_limit=data_size_limit, timeout=timeout,
                            tls_context=tls_context, auth_require_tls=auth_require_tls)

    # --- stable names for private state ---------------------------------------------------

    @property
    def reader(self) -> asyncio.StreamReader:
        return self._reader

    @property
    def writer(self) -> asyncio.StreamWriter:
        return self._writer

    @property
    def starttls_active(self) -> bool:
        return self._tls_protocol is not None

    @property
    def state(self) -> Session:
        """aiosmtpd's per-connection session (HELO name, ESMTP, authenticated)."""
        if self.session is None:
            raise AttributeError("no SMTP session before connection_made")
        return self.session

    def reset_transaction(self) -> None:
        self._set_rset_state()  # type: ignore[no-untyped-call]

    def end_of_data(self) -> None:
        """aiosmtpd's state after DATA (and ``on_end_of_data``)."""
        self._set_post_data_state()

    # --- hooks ------------------------------------------------------------------------------

    async def refuse_at_connect(self) -> bool:
        """Called before the greeting; True when the session was refused (and closed)."""
        return False

    def on_timeout(self) -> None:
        """Called when the command timer fires, before aiosmtpd closes the session."""

    def on_end_of_data(self) -> None:
        """Called when aiosmtpd returns to the post-DATA state."""

    async def on_unknown_command(self, verb: str, arg: str | None) -> None:
        """A command line whose verb no ``smtp_*`` method handles."""

    def on_syntax_error(self) -> None:
        """aiosmtpd is about to answer a line it could not parse (``SYNTAX_ERRORS``)."""

    def screen(self, data: bytes) -> bool:
        """The first bytes of a command line (the stream had none buffered): False drops
        them (the session has decided to close)."""
        return True

    def on_tls_failed(self, error: BaseException) -> None:
        """The STARTTLS handshake failed (aiosmtpd closes the connection next)."""

    # --- stream -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if data and not self._reader._buffer and not self.screen(data):  # type: ignore[attr-defined]
            return
        super().data_received(data)

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            self.on_tls_failed(error.__cause__ or error)
            return ""                           # aiosmtpd closes without replying
        return await super().handle_exception(error)

    def is_syntax_error(self, status: str) -> bool:
        """True for aiosmtpd's own replies to unparsable lines (relay counts them)."""
        return status in SYNTAX_ERRORS

    # --- the overrides of aiosmtpd internals ------------------------------------------------

    def reset_timer(self, duration: float | None = None) -> None:
        """(Re)start the command timer: ``duration`` or the listener's command timeout."""
        self._reset_timeout(duration)

    def keep_deadline(self) -> None:
        """Undo the command timer's last restart: the deadline stays where it was."""
        self._set_deadline(self._previous_deadline)

    def _reset_timeout(self, duration: float | None = None) -> None:
        self._previous_deadline = self._deadline
        self._set_deadline(self.loop.time() + (duration or self._timeout_duration))

    def _set_deadline(self, deadline: float) -> None:
        # One timer per session, re-armed only when it fires early: commands push the
        # deadline forward without a cancel and a new call_later each time.
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or self._deadline < self._timer_at:
            if handle is not None:
                handle.cancel()
            self._timer_at = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timeout_handle = self.loop.call_at(self._deadline, self._timer_fired)
            return
        self._timeout_cb()

    def _timeout_cb(self) -> None:
        if self.transport is None:               # already gone (timer re-armed late)
            return
        self.on_timeout()
        handshaking = self.handshaking
        super()._timeout_cb()  # type: ignore[no-untyped-call]
        if handshaking and self.transport is not None:
            self.connection_lost(None)

    @property
    def handshaking(self) -> bool:
        """True while a STARTTLS handshake is under way. Closing then aborts the socket,
        but the TLS layer never made the connection, so it never reports it lost: the
        closer calls ``connection_lost`` itself, as aiosmtpd's TLS-failure path does."""
        return self._original_transport is not None and self.session is not None \
            and self.session.ssl is None

    async def _handle_client(self) -> None:
        try:
            refused = await self.refuse_at_connect()
        except asyncio.CancelledError:     # EOF (or loss) before the greeting: aiosmtpd
            if self.transport is not None:  # cancels us on EOF and leaves the transport
                self.transport.close()      # half open for the handler to close
            raise
        if refused:
            return
        await super()._handle_client()

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.on_end_of_data()
