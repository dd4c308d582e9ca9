"""An SMTP session's defences against hostile clients: junk, other protocols, deadlines.

``DefendedSession`` sits between the connection (``protocol.SmtpProtocol``) and relay's
session (``server.RelaySMTP``) and holds what a hostile or broken client meets (the
rules themselves are the sans-IO ``session_limits``):

- junk commands (NOOP, RSET, VRFY, EXPN, HELP, unknown verbs, lines that cannot be
  parsed) are counted; one past ``max_junk_commands`` gets ``421 4.7.0`` and the session
  is closed; junk never extends the command deadline (``command_timeout`` runs from the
  last real command, trickled bytes do not extend it either);
- a command line starting with TLS or binary bytes, or an HTTP request line, ends the
  session at once with ``221 2.7.0``;
- DATA is read under the whole-DATA deadline as well as the idle ``data_timeout``;
- the STARTTLS handshake has its own deadline (``tls_handshake_timeout``), and a failed
  or stalled one is one INFO line, never a traceback;
- each session closed on purpose is counted in ``relay_sessions_closed_total{reason}``.
"""

from __future__ import annotations

import contextlib
import logging

from relay.acceptloop import note_tls_failure
from relay.smtp import replies
from relay.smtp.commands import SYNTAX_ERRORS
from relay.smtp.data import DataReader, Event
from relay.smtp.handler import Context
from relay.smtp.protocol import SmtpProtocol, write
from relay.smtp.session_limits import DataDeadline, JunkCounter, http_request, other_protocol

log = logging.getLogger("relay.smtp")


class DefendedSession(SmtpProtocol):
    """The connection with relay's defences; ``RelaySMTP`` adds the commands."""

    ctx: Context
    _client_ip: str
    _closing: bool

    def init_defences(self) -> None:
        self._held: list[bytes] = []            # replies held back (PIPELINING)
        self._junk = JunkCounter(self.ctx.cfg.max_junk_commands)
        self.screening = True                   # command lines expected (not DATA, AUTH)
        self._tls_pending = False               # STARTTLS handshake under way
        self._data_deadline = 0.0               # when the DATA being read must have ended

    # --- writing ------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        if self._held:
            data = b"".join(self._held) + data
            self._held.clear()
        await self.send(data)

    def _write_now(self, line: str) -> None:
        transport = self.transport
        if transport is not None:
            with contextlib.suppress(ConnectionResetError):   # gone: the close that follows
                write(transport, b"".join(self._held) + line.encode() + b"\r\n")
            self._held.clear()

    def _closed_because(self, reason: str) -> None:
        if self.ctx.metrics is not None:
            self.ctx.metrics.sessions_closed.labels(self.ctx.cfg.name, reason).inc()

    # --- deadlines ----------------------------------------------------------------------

    def on_timeout(self) -> None:
        cfg = self.ctx.cfg
        if self._tls_pending:                    # no reply inside a TLS handshake
            self._tls_pending = False
            self._closed_because("tls_timeout")
            note_tls_failure(cfg.name, self._client_ip, TimeoutError(), stalled=True,
                             metrics=self.ctx.metrics, timeout=cfg.tls_handshake_timeout)
            return
        if self.transport is None or self.transport.is_closing():
            return
        if self._data_deadline and self.loop.time() >= self._data_deadline - 0.01:
            log.info("%s: %s sent its message data too slowly: closed at the DATA deadline",
                     cfg.name, self._client_ip)
            self._closed_because("data_deadline")
            self._write_now(replies.data_deadline_reply(self.hostname))
            return
        log.info("%s: %s timed out", cfg.name, self._client_ip)
        self._closed_because("timeout")
        self._write_now(replies.timeout_reply(self.hostname))

    def start_tls_deadline(self) -> None:
        """STARTTLS was accepted: the handshake must finish within its own deadline."""
        self._tls_pending = True
        self.screening = False                  # the client's TLS hello is not junk
        self.reset_timer(self.ctx.cfg.tls_handshake_timeout)

    def tls_done(self) -> None:
        self._tls_pending = False
        self.screening = True

    def on_tls_failed(self, error: BaseException) -> None:
        if self._tls_pending:                    # not already counted as a timeout
            self._tls_pending = False
            self._closed_because("tls_failed")
            cfg = self.ctx.cfg
            note_tls_failure(cfg.name, self._client_ip, error, stalled=False,
                             metrics=self.ctx.metrics, timeout=cfg.tls_handshake_timeout)

    async def read_data(self) -> Event | None:
        """Read DATA up to its real end, under the idle limit and the whole-DATA deadline;
        None when the client went away (the session is closed, nothing is queued)."""
        cfg = self.ctx.cfg
        reader = DataReader(self.ctx.size_limit.size)
        deadline = DataDeadline(self.loop.time(), base=cfg.data_deadline,
                                min_rate=cfg.min_data_rate)
        try:
            while True:
                # The sooner of the idle limit and the whole-DATA deadline ends the session.
                self._data_deadline = deadline.at(reader.received)
                left = self._data_deadline - self.loop.time()
                self.reset_timer(max(0.001, min(cfg.data_timeout, left)))
                chunk = await self.read_some()
                if not chunk:                   # client went away mid-DATA: nothing queued
                    self.close()
                    return None
                event = reader.feed(chunk)
                if event is not None:
                    if event.leftover:
                        self.unread(event.leftover)
                    return event
        finally:
            self._data_deadline = 0.0

    # --- junk and other protocols ---------------------------------------------------------

    def screen(self, data: bytes) -> bool:
        if not self.screening or self._closing:
            return True
        what = other_protocol(data)
        if what is None:
            return True
        self._not_smtp(f"{what} bytes")
        return False

    def _not_smtp(self, what: str) -> None:
        log.info("%s: %s sent %s, not SMTP: closed", self.ctx.cfg.name, self._client_ip, what)
        self._closed_because("not_protocol")
        self.screening = False
        self._write_now(replies.NOT_SMTP)
        self.close()

    async def on_unknown_command(self, verb: str, arg: str | None) -> None:
        if http_request(verb, arg):
            self._not_smtp("an HTTP request")
        elif not verb.isprintable():
            self._not_smtp("a command with control characters")
        elif not await self.junk_command():
            await self.push(f'500 5.5.2 Error: command "{verb[:16]}" not recognized')

    async def junk_command(self, *, counted_as_command: bool = True) -> bool:
        """Count a junk command; True when it was one too many (421 sent, closing).

        ``counted_as_command``: the command loop restarted the command timer for it (a
        verb it dispatched), which is undone so that junk never extends the deadline.
        """
        if counted_as_command:
            self.keep_deadline()
        if not self._junk.add():
            return False
        log.info("%s: %s sent more than %d junk commands: closed", self.ctx.cfg.name,
                 self._client_ip, self._junk.limit)
        self._closed_because("junk")
        self.screening = False
        await self._send(replies.TOO_MUCH_JUNK.encode() + b"\r\n")
        self.close()
        return True

    def is_syntax_error(self, status: str) -> bool:
        """True for the command loop's replies to unparsable lines (counted as junk)."""
        return status in SYNTAX_ERRORS

    def message_accepted(self) -> None:
        self._junk.message_accepted()

    async def smtp_NOOP(self, arg: str | None) -> None:
        if not await self.junk_command():
            await super().smtp_NOOP(arg)

    async def smtp_VRFY(self, arg: str | None) -> None:
        if not await self.junk_command():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str | None) -> None:
        if not await self.junk_command():
            await super().smtp_EXPN(arg)

    async def smtp_HELP(self, arg: str | None) -> None:
        if not await self.junk_command():
            await super().smtp_HELP(arg)
