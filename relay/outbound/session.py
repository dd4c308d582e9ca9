"""One upstream SMTP session once it is set up: MAIL transactions, RSET, QUIT, classified.

``relay.outbound.session_setup.open_session`` sets a session up (transport, TLS,
greeting/EHLO, AUTH); from then on its bytes go through ``Wire`` (``relay.outbound.wire``).
Used by the SMTP courier (``relay.outbound.smtp_courier``) and by ``relay check``.
A session that breaks raises ``SessionError`` (a transient ``DeliveryError`` with a
bounded ``reason`` and an operator hint), which never bounces mail.
Commands return ``Reply`` objects so the caller classifies them per recipient.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiosmtplib

from relay.config.schema import Secret, UpstreamConfig
from relay.errors import DeliveryError
from relay.outbound.wire import (
    Reply,
    Wire,
    WireError,
    command_line,
    dot_stuff,
    printable,
)
from relay.spool.layout import bare_line_ending


class SessionError(DeliveryError):
    """An upstream session could not be set up or broke; always transient for delivery.

    ``unknown``: the session broke after the whole message was sent and before the
    provider's reply, so the provider may have accepted it (a retry may duplicate it).
    """

    def __init__(self, message: str, *, reason: str, stage: str, reply: str = "",
                 hint: str = "", unknown: bool = False) -> None:
        super().__init__(printable(message), permanent=False, reply=printable(reply),
                         reason=reason, hint=hint)
        self.stage = stage
        self.unknown = unknown


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who relay is toward the provider for one session (``relay.outbound.attempt``)."""

    mechanism: Literal["none", "password", "xoauth2"] = "none"
    username: str = ""
    password: Secret | None = None
    token_source: str | None = None

    @property
    def key(self) -> tuple[str, str, str]:
        """Pool key: sessions are only reused for the same identity."""
        return (self.mechanism, self.username, self.token_source or "")


class SmtpSession:
    """A set-up SMTP session to one upstream, ready for MAIL transactions.

    Made by ``relay.outbound.session_setup.open_session``, which ends with ``take_over``.
    """

    def __init__(self, upstream: UpstreamConfig, smtp: aiosmtplib.SMTP,
                 credentials: Credentials) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self._smtp = smtp
        self._wire: Wire | None = None   # the byte pump once set up (``relay.outbound.wire``)
        self.greeting = ""
        self.ehlo_reply = ""
        self.tls_info: dict[str, Any] = {}
        self.messages = 0          # transactions started on this session
        self.dirty = False         # a transaction was begun and not finished: RSET first
        self.idle_since = 0.0      # loop time it was last returned to the pool
        self.broken = False        # set on any protocol-level failure: never reuse
        self.discarded = False     # set by the delivery pool once it let go of the session

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        """The TLS object of the session (certificate, version), None without TLS."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            obj = self._smtp.get_transport_info("ssl_object")
            return obj if isinstance(obj, ssl.SSLObject) else None
        return None

    def supports(self, extension: str) -> bool:
        return self._smtp.supports_extension(extension)

    def extension(self, name: str) -> str:
        """The EHLO parameter of an extension (e.g. SIZE's limit), "" if none."""
        return str(self._smtp.esmtp_extensions.get(name.lower(), ""))

    @property
    def pipelining(self) -> bool:
        """The provider offers PIPELINING (RFC 2920): MAIL, RCPT... and DATA in one write."""
        return self.supports("pipelining")

    def take_over(self) -> None:
        """Set up: from here on the session's bytes go through ``Wire``, not aiosmtplib."""
        transport = self._smtp.transport
        if transport is None or transport.is_closing():
            raise self._broken("greeting", WireError("connection lost after set-up"))
        # A stream transport, not always an asyncio.Transport subclass (uvloop's are not).
        self._wire = Wire(cast(asyncio.Transport, transport))

    def send(self, *lines: bytes) -> None:
        """Write whole command lines (``command_line``) without waiting for replies."""
        try:
            if self._wire is None:
                raise WireError("the session is not set up")
            self._wire.write(b"".join(lines))
        except OSError as exc:
            stage = lines[0].split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace")
            raise self._broken(stage.strip().lower(), exc) from exc

    async def reply(self, stage: str, *, timeout: float | None = None) -> Reply:
        """The next reply, in order; a lost connection or timeout raises ``SessionError``."""
        try:
            if self._wire is None:
                raise WireError("the session is not set up")
            reply = await self._wire.reply(
                timeout if timeout is not None else self.upstream.command_timeout)
        except OSError as exc:      # WireError and TimeoutError are OSErrors
            raise self._broken(stage, exc) from exc
        if reply.code == 421:
            self.broken = True
        return reply

    async def command(self, *args: bytes, timeout: float | None = None) -> Reply:
        """Send one command and wait for its reply."""
        self.send(command_line(*args))
        return await self.reply(args[0].decode("ascii", "replace").lower(), timeout=timeout)

    async def data(self, data: bytes, *, checked: bool = False,
                   before_send: Callable[[], None] | None = None,
                   start: Reply | None = None) -> Reply:
        """DATA with the message; returns the 354-stage refusal or the final reply.

        ``start`` is DATA's reply when DATA went out pipelined already. The message is
        dot-stuffed with ``bytes.replace`` (regexes cost ~1.5 ms per 100 KB); bare CR/LF
        is refused, a smuggling vector (``checked=True``: the caller made sure there is
        none). ``before_send`` runs after the 354, right before the write: past it the
        provider may have the message.
        """
        if not checked and bare_line_ending(data) is not None:
            raise ValueError("message contains a bare CR or LF")
        if start is None:
            start = await self.command(b"DATA")
        if start.code != 354:
            if start.code < 400:      # 2xx/3xx but not 354: out of step, nothing was sent
                self.broken = True
                raise SessionError(
                    f"{self.upstream.name} answered DATA with {start.text[:80]!r} instead of "
                    "354; the message was not sent", reason="protocol", stage="data",
                    hint="the provider (or something between) does not speak SMTP "
                         "properly; mail is deferred and retried")
            return start
        if before_send is not None:
            before_send()
        self.send(dot_stuff(data))
        try:
            return await self.reply("data", timeout=self.upstream.data_timeout)
        except SessionError as exc:
            raise self._broken("data", exc.__cause__ or exc, sent=True) from exc

    async def abandon_data(self) -> None:
        """End a DATA the provider accepted with 354 though no recipient was: a lone "."
        (RFC 2920 3.1); its reply does not matter, the session wants an RSET after it."""
        self.dirty = True
        self.send(b".\r\n")
        await self.reply("data", timeout=self.upstream.data_timeout)

    async def rset(self) -> bool:
        """RSET before reusing the session; False if the session is no longer usable."""
        try:
            reply = await self.command(b"RSET", timeout=min(30.0, self.upstream.command_timeout))
        except SessionError:
            return False
        return reply.code == 250 and not self.broken

    @property
    def usable(self) -> bool:
        return not self.broken and self._wire is not None and self._wire.open

    async def quit(self) -> None:
        """Polite QUIT (bounded wait), then close."""
        if self._wire is not None and self._wire.open:
            with contextlib.suppress(SessionError):
                await self.command(b"QUIT", timeout=5.0)
        self.close()

    def close(self) -> None:
        self.broken = True
        self._smtp.close()

    def _broken(self, stage: str, exc: BaseException, *, sent: bool = False) -> SessionError:
        self.broken = True
        return connection_lost(self.upstream, stage, exc, sent=sent)


def connection_lost(upstream: UpstreamConfig, stage: str, exc: BaseException, *,
                    sent: bool = False) -> SessionError:
    """The session broke at ``stage`` (timed out or disconnected); ``sent``: after the
    whole message went out, so the provider may have it."""
    if isinstance(exc, TimeoutError):
        reason, what = "timeout", "timed out"
    else:
        reason, what = "disconnected", "connection lost"
    if sent:
        return SessionError(
            f"{upstream.name}: {what} waiting for the reply to the message: {exc}; "
            "the provider may have accepted it", reason=reason, stage=stage, unknown=True,
            hint="the outcome is unknown: mail is deferred and retried, so the recipient "
                 "may get it twice (counted in relay_delivery_outcome_unknown_total)")
    return SessionError(f"{upstream.name}: {what} during {stage}: {exc}",
                        reason=reason, stage=stage,
                        hint="the provider or the network path (proxy) dropped or stalled "
                             "the session; mail is deferred and retried")
