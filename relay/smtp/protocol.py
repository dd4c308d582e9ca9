"""One SMTP server connection: the byte pump, the command loop, STARTTLS and the timer.

``SmtpProtocol`` is an ``asyncio.Protocol`` with one task per connection that reads
command lines from its own buffer and calls ``smtp_<VERB>(arg)``; ``relay.smtp.server``
(through ``defences``) implements the verbs. It replaces aiosmtpd's session, whose
stream reader and writer, per-command hooks and logging cost about four times the CPU
of this loop per connection on the same machine (a bare aiosmtpd server 1.1 ms per
one-message connection, a task-per-connection protocol 0.37 ms, smtp-source at 20
sessions), and whose private state relay had to reach into for every override.

Command lines are cut and parsed by the sans-IO ``commands`` module (a line longer than
``line_length_limit`` is skipped to its end and answered ``500 Command line too long``).
Subclasses hook in with ``refuse_at_connect``, ``on_timeout``,
``on_unknown_command``, ``screen`` (the first bytes of a command line),
``on_tls_failed``, ``tls_started`` and ``reset_transaction``.

The buffer is bounded: reading pauses while more than ``MAX_BUFFER`` bytes wait.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import cast

from relay.smtp import replies
from relay.smtp.commands import OVERLONG, TOO_LONG, Command, LineBuffer, Overlong, parse_line

log = logging.getLogger("relay.smtp")

MAX_BUFFER = 1024 * 1024               # bytes read ahead of the session before pausing
_VERBS: dict[type, dict[str, Callable[..., Awaitable[None]]]] = {}


class LineTooLong(Exception):
    """A line (an AUTH response) did not end within the limit."""


class SessionState:
    """What the client said about itself: its HELO name, and whether it said EHLO."""

    __slots__ = ("extended_smtp", "host_name")

    def __init__(self) -> None:
        self.host_name = ""
        self.extended_smtp = False


def verbs(cls: type) -> dict[str, Callable[..., Awaitable[None]]]:
    """The SMTP verbs a session class implements (its smtp_* methods), computed once."""
    table = _VERBS.get(cls)
    if table is None:
        table = _VERBS[cls] = {name[5:]: getattr(cls, name) for name in dir(cls)
                               if name.startswith("smtp_")}
    return table


def write(transport: asyncio.Transport, data: bytes) -> None:
    """``transport.write(data)``; ConnectionResetError when the connection is already
    gone: uvloop closes a handle before its protocol hears of it (``connection_lost``
    comes later), and then raises RuntimeError where asyncio's loop drops the bytes."""
    try:
        transport.write(data)
    except RuntimeError as exc:
        raise ConnectionResetError(f"connection lost: {exc}") from exc


class SmtpProtocol(asyncio.Protocol):
    """The connection; see the module docstring."""

    line_length_limit = 32768          # longest command line buffered; longer is skipped

    loop: asyncio.AbstractEventLoop
    hostname: str
    tls_context: ssl.SSLContext | None

    def init_state(self, *, hostname: str, timeout: float,
                   tls_context: ssl.SSLContext | None) -> None:
        self.loop = asyncio.get_running_loop()
        self.hostname = hostname
        self.tls_context = tls_context
        self.transport: asyncio.Transport | None = None
        self.state = SessionState()
        self.starttls_active = False
        self._tls = False
        self._verbs = verbs(type(self))
        self._timeout_duration = timeout
        self._buf = LineBuffer()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._timer_at = 0.0
        self._previous_deadline = 0.0

    # --- hooks --------------------------------------------------------------------------

    async def refuse_at_connect(self) -> bool:
        """Called before the greeting; True when the session was refused (and closed)."""
        return False

    def on_timeout(self) -> None:
        """The command timer fired; the connection is closed next."""

    def reset_transaction(self) -> None:
        """Forget the mail transaction under way (RSET; HELO, EHLO and STARTTLS too)."""

    async def on_unknown_command(self, verb: str, arg: str | None) -> None:
        """A command line whose verb no ``smtp_*`` method handles."""

    def screen(self, data: bytes) -> bool:
        """The first bytes of a command line (none buffered before): False drops them
        (the session has decided to close)."""
        return True

    def on_tls_failed(self, error: BaseException) -> None:
        """The STARTTLS handshake failed or was cut; the connection is gone."""

    def tls_started(self) -> None:
        """The STARTTLS handshake finished: the client starts over (RFC 3207 4.2)."""

    async def push(self, status: str) -> None:
        await self.send(status.encode("utf-8", "surrogateescape") + b"\r\n")

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %r", error, exc_info=error)
        return replies.LOCAL_ERROR

    # --- connection -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always an asyncio.Transport subclass (uvloop's
        # are not): no isinstance check here.
        self.transport = cast(asyncio.Transport, transport)
        self._tls = transport.get_extra_info("sslcontext") is not None
        self.reset_timer()
        self._task = self.loop.create_task(self._handle_client())

    def data_received(self, data: bytes) -> None:
        if not self._buf and not self.screen(data):
            return
        self._buf.feed(data)
        if len(self._buf) > MAX_BUFFER and not self._reading_paused and \
                self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        # A plain connection stays open for the replies to what the client sent before
        # it shut its side (the command loop closes it); TLS cannot stay half open.
        self._eof = True
        self._wake()
        return not self._tls

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
        self._wake()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("connection lost"))
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self.transport = None

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- writing --------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write ``data``; waits only while the client does not read its replies."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        write(transport, data)
        if self._write_paused:
            self._drain = self.loop.create_future()
            await self._drain

    # --- reading --------------------------------------------------------------------------

    def has_line(self) -> bool:
        """True when a whole line is already buffered (the client is pipelining)."""
        return self._buf.has_line()

    def unread(self, data: bytes) -> None:
        """Put ``data`` back in front of the buffer (pipelined commands after DATA)."""
        self._buf.unread(data)

    async def _more(self) -> bool:
        """Wait for more bytes; False at end of input."""
        if self._eof:
            return False
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        self._waiter = self.loop.create_future()
        await self._waiter
        return True

    async def read_some(self) -> bytes:
        """What is buffered, waiting for some if nothing is; b"" at end of input."""
        while not self._buf:
            if not await self._more():
                return b""
        data = self._buf.take()
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def read_line(self, limit: int) -> bytes | None:
        """The next line without its line ending; None at end of input; LineTooLong
        when no line ending came within ``limit`` bytes (the rest of the line is then
        skipped by the next read)."""
        line = await self._line(limit)
        if line is OVERLONG:
            raise LineTooLong
        return line  # type: ignore[return-value]

    async def _line(self, limit: int) -> bytes | Overlong | None:
        while (line := self._buf.next_line(limit)) is None:
            if not await self._more():
                return None
        return line

    # --- the timer --------------------------------------------------------------------------

    def reset_timer(self, duration: float | None = None) -> None:
        """(Re)start the command timer: ``duration`` or the listener's command timeout."""
        self._previous_deadline = self._deadline
        self._set_deadline(self.loop.time() + (duration or self._timeout_duration))

    def keep_deadline(self) -> None:
        """Undo the command timer's last restart: the deadline stays where it was."""
        self._set_deadline(self._previous_deadline)

    def _set_deadline(self, deadline: float) -> None:
        # One timer per session, re-armed only when it would fire late: commands push
        # the deadline forward without a cancel and a new call_at each time.
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.cancelled() or deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._timer_fired)

    def _timer_fired(self) -> None:
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._timer_fired)
            return
        if self.transport is None:
            return
        self.on_timeout()
        self.close()

    # --- the command loop -------------------------------------------------------------------

    async def _handle_client(self) -> None:
        try:
            if await self.refuse_at_connect():
                return
            await self.push(f"220 {self.hostname} ESMTP")
            while self.transport is not None and not self.transport.is_closing():
                line = await self._line(self.line_length_limit)
                if line is None:                       # the client went away
                    break
                try:
                    await self._command(line)
                except (asyncio.CancelledError, ConnectionError):
                    raise
                except Exception as error:
                    await self.push(await self.handle_exception(error))
        except (asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self.close()

    async def _command(self, line: bytes | Overlong) -> None:
        command = parse_line(line, extended=self.state.extended_smtp) \
            if isinstance(line, bytes) else TOO_LONG
        if not isinstance(command, Command):
            await self.push(command)
            return
        self.reset_timer()                  # junk undoes it (keep_deadline)
        method = self._verbs.get(command.verb)
        if method is None:
            await self.on_unknown_command(command.verb, command.arg)
            return
        await method(self, command.arg)

    # --- STARTTLS -----------------------------------------------------------------------------

    async def start_tls(self, handshake_timeout: float) -> bool:
        """Answer 220 and run the server side of the TLS handshake; False (connection
        gone, ``on_tls_failed`` called) when it fails."""
        assert self.tls_context is not None
        await self.push("220 Ready to start TLS")
        transport = self.transport
        if transport is None:
            return False
        self._buf.clear()                   # RFC 3207 5: nothing sent before TLS counts
        try:
            tls = await self.loop.start_tls(transport, self, self.tls_context,
                                            server_side=True,
                                            ssl_handshake_timeout=handshake_timeout + 1)
        except OSError as exc:              # ssl.SSLError, reset, aborted: all OSError
            tls, error = None, exc
        else:                               # None: closed during the handshake (timer)
            error = ConnectionResetError("connection closed during the TLS handshake")
        if tls is None:
            self.on_tls_failed(error)
            transport.abort()
            if self.transport is not None:  # TLS never made the connection: no loss call
                self.connection_lost(None)
            return False
        self.transport = tls
        self.starttls_active = self._tls = True
        self.state = SessionState()         # (what arrived since is the client's, in TLS)
        self.tls_started()
        return True

    # --- commands every session has -------------------------------------------------------------

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: QUIT")
            return
        await self.push("221 2.0.0 Bye")
        self.close()

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self.reset_transaction()
        await self.push("250 2.0.0 OK")

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not arg:
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await self.push("252 2.5.0 Cannot VRFY user, but will accept message and attempt "
                        "delivery")

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push("502 5.5.1 EXPN not implemented")

    async def smtp_HELP(self, arg: str | None) -> None:
        offered = [verb for verb in sorted(self._verbs)
                   if verb != "STARTTLS" or self.tls_context is not None]
        await self.push("250 2.0.0 Supported commands: " + " ".join(offered))

